"""The rehearsal: the real-model profiles run on this CPU, with no GPU and no Hub (``make rehearse``).

A Colab student's notebook calls ``from_pretrained("meta-llama/Llama-3.2-3B")`` and
``PeftModel.from_pretrained(model, "ed-donner/...")``. Here those very calls resolve offline (``HF_HUB_OFFLINE=1``)
from a local Hugging Face cache in the Hub's own layout, which this module builds:

- **the checkpoints** have the real configs of ``data/reference/`` (rope scaling, tied or untied embeddings, the
  128,256-token vocabulary, grouped-query attention, head_dim) at full width, stored in bfloat16 as on the Hub,
  with random weights and fewer decoder layers (``REHEARSAL_LAYERS``; never as few as a cell singles out);
- **the tokenizer is Llama 3's own**: the tiktoken vocabulary that Meta's ``llama-models`` package ships, converted
  with transformers' ``TikTokenConverter``, Llama 3's 256 special tokens, and ``<|begin_of_text|>`` before every
  text (``check_llama3_tokenizer`` compares ids with the published ones);
- **the adapters** have what the course knows of the Hub adapters: r=32, lora_alpha=64, dropout 0.1 on q/k/v/o,
  with ``lora_B`` nonzero (a trained adapter's is), or any other shape (``AdapterShape``).

Random weights make every *law* checkable (estimates equal measurements, from scratch equals the library, counts
equal formulas, memory comes back) and no *observation* (quality thresholds, an adapter beating its base).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

REHEARSAL_LAYERS = 3
"""Decoder layers of a rehearsal checkpoint: one more than the most any cell singles out (07 calibrates the first
two layers of a real Llama), so that no cell's choice covers the whole model by accident."""

REHEARSED_PROFILES = ("llama-3.2-3b", "llama-3.1-8b")

LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
"""Llama 3.1/3.2's first special tokens as the Hub's tokenizer names them, in id order from 128,000 (llama-models
calls 128005 ``<|step_id|>``); the rest of the 256 are ``<|reserved_special_token_3|>`` to ``_247|>``."""

LLAMA3_PUBLISHED_IDS = {"Hello world": [128000, 9906, 1917]}
"""Token ids the Hub's Llama 3 tokenizer gives (with ``<|begin_of_text|>``), to check a conversion against."""


@dataclass(frozen=True)
class AdapterShape:
    """What a rehearsal adapter looks like: rank, alpha, dropout and target modules."""

    r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if self.r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1 or not self.target_modules:
            raise ValueError(f"not a LoRA adapter shape: {self}")


HUB_ADAPTER_SHAPE = AdapterShape()
"""What the course knows of the Hub adapters (r=32, alpha=64, dropout 0.1, attention projections)."""

OTHER_ADAPTER_SHAPE = AdapterShape(r=16, lora_alpha=16, lora_dropout=0.05,
                                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
"""A second shape, to show that no cell depends on the first one's numbers (scaling 1, all linear layers)."""


def llama3_tokenizer_model() -> Path:
    """The path of Llama 3's tiktoken vocabulary inside the installed ``llama-models`` package."""
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
    except ModuleNotFoundError as error:
        raise RuntimeError("The rehearsal needs Meta's llama-models package for Llama 3's tokenizer: "
                           "pip install --no-deps -r requirements-rehearse.txt (make rehearse does).") from error
    if not path.is_file():
        raise RuntimeError(f"llama-models is installed but has no {path}: pin the version in requirements-rehearse.txt")
    return path


def llama3_special_tokens() -> list[str]:
    """All 256 special tokens of Llama 3, in id order (128,000 to 128,255), as the Hub's tokenizer names them."""
    reserved = [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL_TOKENS))]
    return [*LLAMA3_SPECIAL_TOKENS, *reserved]


def build_llama3_tokenizer():
    """Llama 3's tokenizer as a transformers fast tokenizer, converted from the tiktoken file of ``llama-models``.

    Like the Hub's: ``<|begin_of_text|>`` (128000) before every text, ``<|end_of_text|>`` (128001) as end of
    text, 128,256 tokens in all.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = llama3_special_tokens()
    backend = TikTokenConverter(vocab_file=str(llama3_tokenizer_model()), extra_special_tokens=specials).converted()
    bos = specials[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=specials[1],
                                   model_max_length=131072)


def check_llama3_tokenizer(tokenizer) -> None:
    """Raise ValueError unless ``tokenizer`` gives the published Llama 3 ids (``LLAMA3_PUBLISHED_IDS``)."""
    for text, expected in LLAMA3_PUBLISHED_IDS.items():
        got = tokenizer(text).input_ids
        if got != expected:
            raise ValueError(f"not Llama 3's tokenizer: {text!r} gives {got}, the Hub's gives {expected}")
    if len(tokenizer) != 128256:
        raise ValueError(f"Llama 3 has 128,256 tokens; this tokenizer has {len(tokenizer):,}")


def rehearsal_config(profile_name: str, layers: int = REHEARSAL_LAYERS) -> dict:
    """The profile's public config (``data/reference/``) with ``layers`` decoder layers: everything else is real."""
    if profile_name not in REHEARSED_PROFILES:
        raise ValueError(f"the rehearsal builds {', '.join(REHEARSED_PROFILES)}, not {profile_name!r}")
    if not isinstance(layers, int) or layers < REHEARSAL_LAYERS:
        raise ValueError(f"at least {REHEARSAL_LAYERS} layers (notebook 07 calibrates the first two), got {layers!r}")
    reference = REPO_ROOT / "data" / "reference" / f"{profile_name}.config.json"
    config = {k: v for k, v in json.loads(reference.read_text()).items() if not k.startswith("_")}
    if config["num_hidden_layers"] < layers:
        raise ValueError(f"{profile_name} has only {config['num_hidden_layers']} layers")
    return {**config, "num_hidden_layers": layers, "torch_dtype": "bfloat16"}


def snapshot_commit(repo_id: str, files_digest: str) -> str:
    """The commit hash a rehearsal snapshot of ``repo_id`` gets: a digest of what was built into it."""
    return hashlib.sha1(f"{repo_id}:{files_digest}".encode()).hexdigest()


def adapter_digest(shape: AdapterShape, seed: int = 1) -> str:
    return json.dumps(asdict(shape), sort_keys=True) + f":{seed}"


def snapshot_folder(cache: Path, repo_id: str, files_digest: str) -> Path:
    """``<cache>/models--org--name/snapshots/<commit>``, with ``refs/main`` naming that commit: the Hub's layout."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = snapshot_commit(repo_id, files_digest)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build_model_snapshot(cache: Path, profile_name: str, layers: int = REHEARSAL_LAYERS, seed: int = 0):
    """Write the profile's rehearsal checkpoint and Llama 3's tokenizer into ``cache``; return the model (bf16)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from helpers import profiles

    config_dict = rehearsal_config(profile_name, layers)
    profile = profiles.get_profile(profile_name)
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = snapshot_folder(cache, profile.model_id, f"{json.dumps(config_dict, sort_keys=True)}:{seed}")
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False,
                     temperature=None, top_p=None).save_pretrained(folder)
    tokenizer = build_llama3_tokenizer()
    check_llama3_tokenizer(tokenizer)
    tokenizer.save_pretrained(folder)
    return model


def build_adapter_snapshot(cache: Path, profile_name: str, model, shape: AdapterShape = HUB_ADAPTER_SHAPE,
                           seed: int = 1) -> Path:
    """Write a LoRA adapter of ``shape`` for ``model`` under the profile's Hub adapter id; ``lora_B`` is nonzero."""
    import torch
    from peft import LoraConfig, get_peft_model

    from helpers import profiles

    profile = profiles.get_profile(profile_name)
    if not profile.adapter_id:
        raise ValueError(f"profile {profile_name!r} has no adapter")
    settings = LoraConfig(r=shape.r, lora_alpha=shape.lora_alpha, lora_dropout=shape.lora_dropout,
                          target_modules=list(shape.target_modules), task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a trained adapter's B is not zero; peft starts it at zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    folder = snapshot_folder(cache, profile.adapter_id, adapter_digest(shape, seed))
    peft_model.save_pretrained(folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = profile.model_id
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    peft_model.unload()
    return folder


def build_cache(cache: Path, profile_names: tuple[str, ...] = REHEARSED_PROFILES, layers: int = REHEARSAL_LAYERS,
                shape: AdapterShape = HUB_ADAPTER_SHAPE) -> dict[str, Path]:
    """A local Hugging Face cache holding each profile's model and adapter; returns each repository's folder."""
    import gc

    from helpers import profiles

    cache = Path(cache)
    built = {}
    for name in profile_names:
        profile = profiles.get_profile(name)
        for repo_id in (profile.model_id, profile.adapter_id):
            shutil.rmtree(cache / f"models--{repo_id.replace('/', '--')}", ignore_errors=True)
        model = build_model_snapshot(cache, name, layers)
        build_adapter_snapshot(cache, name, model, shape)
        del model
        gc.collect()
        built[name] = cache / f"models--{profile.model_id.replace('/', '--')}"
    return built


# --- the lane: make rehearse -------------------------------------------------------------------------------------

REHEARSAL_HARDWARE = {"llama-3.2-3b": "t4", "llama-3.1-8b": "a100-40gb"}
"""The GPU each profile's decisions are made for: the one the automatic choice would pick it on."""

WORK_DIR = REPO_ROOT / "build" / "rehearsal"

REHEARSAL_WORKLOAD = "small"
"""The rehearsal's ``COURSE_WORKLOAD`` unless the caller sets one (``COURSE_WORKLOAD=full make rehearse``): random
weights need no long evaluations, and it keeps both profiles within the lane's budget (``helpers.workload``)."""


def rehearsal_command(profile_name: str, notebooks: list[Path], cache: Path, output_dir: Path,
                      environ: dict[str, str], cell_timeout: int = 1800,
                      python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The pytest command line and environment that rehearse one profile (pure).

    ``pytest --nbval-lax`` over the notebooks, as the GPU lanes run them, with the kernels told: this profile
    (``COURSE_PROFILE``), decisions for its GPU (``COURSE_REHEARSAL``), the Hub off and this local cache
    (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE``). ``helpers.nbval_keep`` keeps the executed copies.
    """
    import sys

    from helpers import environment, profiles, workload
    from helpers.runner import nbval_lax_argv

    if profile_name not in REHEARSAL_HARDWARE:
        raise ValueError(f"the rehearsal runs {', '.join(REHEARSAL_HARDWARE)}, not {profile_name!r}")
    argv = nbval_lax_argv(notebooks, cell_timeout=cell_timeout, output_dir=output_dir,
                          python=python or sys.executable, extra=("-q",))
    env = {**environ, workload.WORKLOAD_ENV_VAR: environ.get(workload.WORKLOAD_ENV_VAR) or REHEARSAL_WORKLOAD,
           profiles.PROFILE_ENV_VAR: profile_name,
           environment.REHEARSAL_ENV_VAR: REHEARSAL_HARDWARE[profile_name],
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return argv, env


def claim_counts(notebook_path: Path) -> tuple[int, int]:
    """``(laws checked, observations not checked)`` in an executed notebook: its ✓ lines and its
    ``- not checked`` lines."""
    import nbformat

    from helpers.claims import CHECK_MARK, NOT_CHECKED_MARK

    text = "".join(output.get("text", "") for cell in nbformat.read(notebook_path, as_version=4).cells
                   if cell.cell_type == "code" for output in cell.get("outputs", []))
    lines = text.splitlines()
    return (sum(line.startswith(CHECK_MARK + " ") for line in lines),
            sum(line.startswith(f"{NOT_CHECKED_MARK} not checked:") for line in lines))


def rehearse(profile_names: list[str], notebooks: list[Path], work: Path = WORK_DIR, rebuild: bool = False,
             shape: AdapterShape = HUB_ADAPTER_SHAPE) -> int:
    """Build the cache (unless there, with this adapter shape), rehearse each profile, print one summary; 1 when a
    notebook failed."""
    import os
    import subprocess
    import time

    from helpers.runner import JUNIT_NAME, junit_results, lane_summary

    from helpers import environment, profiles

    environment.quiet_known_noise(verbose=False)  # the build's progress bars and notes
    cache = work / "hub-cache"
    summaries, failed = [], False
    for name in profile_names:
        profile = profiles.get_profile(name)
        marker = cache / f"models--{profile.model_id.replace('/', '--')}" / "refs" / "main"
        adapter_ref = cache / f"models--{profile.adapter_id.replace('/', '--')}" / "refs" / "main"
        same_shape = adapter_ref.is_file() and adapter_ref.read_text() == snapshot_commit(profile.adapter_id,
                                                                                          adapter_digest(shape))
        if rebuild or not marker.is_file() or not same_shape:
            start = time.monotonic()
            build_cache(cache, (name,), shape=shape)
            real_layers = json.loads(profile.reference_config.read_text())["num_hidden_layers"]
            print(f"built {name}: {REHEARSAL_LAYERS} of its {real_layers} decoder layers (a reduction), full width and "
                  f"vocabulary, random bfloat16 weights, Llama 3's tokenizer, an adapter with {shape}, in "
                  f"{time.monotonic() - start:.0f} s",
                  flush=True)
        output_dir = work / name
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        argv, env = rehearsal_command(name, notebooks, cache, output_dir, dict(os.environ))
        print(f"rehearsing {name} (decisions for {REHEARSAL_HARDWARE[name]}, executed on this CPU)", flush=True)
        subprocess.run(argv, env=env, cwd=REPO_ROOT)
        results = junit_results(output_dir / JUNIT_NAME, notebooks)
        failed |= not all(result.passed for result in results)
        lines = [lane_summary("rehearsal", name, results, output_dir)]
        width = max([len(path.stem) for path in notebooks] + [22])
        for path in notebooks:
            copy = output_dir / path.name
            if copy.is_file():
                laws, observations = claim_counts(copy)
                lines.append(f"    {path.stem:<{width}} laws checked {laws:>3}, "
                             f"observations not checked here (random weights) {observations:>3}")
        summaries.append("\n".join(lines))
    print("\n".join(summaries))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    from helpers.runner import NOTEBOOK_DIR, course_notebooks

    parser = argparse.ArgumentParser(description="Rehearse the real-model profiles on this CPU (see the docstring).")
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--profile", action="append", choices=REHEARSED_PROFILES,
                        help="a profile to rehearse (repeatable; default: both)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the local Hub cache")
    parser.add_argument("--adapter", choices=("hub", "other"), default="hub",
                        help="the adapters' shape: what the course knows of the Hub's (r=32, alpha=64, q/k/v/o; "
                             "default) or another (r=16, alpha=16, every linear layer)")
    args = parser.parse_args(argv)
    chosen = [NOTEBOOK_DIR / name for name in args.notebooks] if args.notebooks else course_notebooks()
    missing = [str(path) for path in chosen if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    shape = HUB_ADAPTER_SHAPE if args.adapter == "hub" else OTHER_ADAPTER_SHAPE
    return rehearse(args.profile or list(REHEARSED_PROFILES), chosen, rebuild=args.rebuild, shape=shape)


if __name__ == "__main__":
    raise SystemExit(main())
