"""Shared code of the course notebooks: one module per concept.

- ``environment``: hardware, Colab, offline mode, seeding, quieting known noise
- ``profiles``: which model, adapter and dtypes a notebook uses, chosen from the hardware
- ``models``: loading a profile's model in a given precision scheme
- ``memory``: footprints (reported, true, estimated), meta-device models, snapshots, release
- ``quantization``: LLM.int8 and NF4 from scratch, checked against bitsandbytes
- ``packing``: several low-bit values per byte
- ``lora``: LoRA parameter counts and adapter inspection
- ``quality``: perplexity, next-token agreement, greedy generations
- ``plots``: the figures the notebooks share
"""
