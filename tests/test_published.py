"""helpers.published: the published figures are data with sources, and panels print them beside ours."""

import json

import pytest

from helpers import published


def test_every_published_result_has_a_source_and_numbers():
    results = published.load()
    assert len(results) >= 7
    for result in results.values():
        assert result.source and result.setting and result.statement and result.unit
        assert result.arxiv == "" or result.arxiv.count(".") == 1


def test_figures_match_the_checked_reference_sheet():
    qlora = published.get("qlora-double-quantization")
    # 32/64 bits of float32 absmax per weight, against 8/64 + 32/(64*256) with double quantization
    assert qlora.figure("constants bits, single") == 32 / 64
    assert qlora.figure("constants bits, double") == round(8 / 64 + 32 / (64 * 256), 3)
    assert qlora.figure("saving bits") == round(32 / 64 - (8 / 64 + 32 / (64 * 256)), 3)
    assert published.get("qlora-table-2").ranking() == ["NFloat4 + DQ", "Float4 (E3M0)", "Float4 (E2M1)", "Int4"]
    assert published.get("llm-int8-table-5").ranking(lower_is_better=False)[0] == "175B"
    assert published.get("llama-cpp-bits").figure("Q4_0") == (32 * 4 + 16) / 32
    table_7 = published.get("lora-table-7")
    # the paper's "21.5 ≈ 6.91/0.32" amplification at r = 4, and its smaller one at r = 64
    assert table_7.figure("r=4 ||ΔW_q||") / table_7.figure("r=4 along ΔW") == pytest.approx(21.5, abs=0.1)
    assert table_7.figure("r=64 ||ΔW_q||") / table_7.figure("r=64 along ΔW") < 2
    for r in (4, 64):
        along = [table_7.figure(f"r={r} along {d}") for d in ("random", "ΔW", "W")]
        assert along == sorted(along)  # random < the update's directions < W's own


def test_a_panel_prints_the_citation_ours_and_what_differs(capsys):
    text = published.panel("lora-gpt3", "4,096 times fewer", "a 6.8M-parameter model, r = 8")
    assert capsys.readouterr().out == text + "\n"
    assert text.splitlines()[0] == "Published (LoRA (Hu et al., 2021), sections 1 and 4.2, arXiv:2106.09685):"
    assert text.splitlines()[-2:] == ["This course: 4,096 times fewer", "What differs: a 6.8M-parameter model, r = 8"]


def test_bad_keys_and_entries_say_what_is_wrong(tmp_path):
    with pytest.raises(KeyError, match="no published result 'gptq'; data/published_results.json has: qlora"):
        published.get("gptq")
    with pytest.raises(KeyError, match="has no figure 'Int3'"):
        published.get("qlora-table-2").figure("Int3")
    with pytest.raises(ValueError, match="needs ours as a non-empty sentence"):
        published.panel("lora-gpt3", " ", "x")
    broken = tmp_path / "results.json"
    broken.write_text(json.dumps({"x": {"source": "s", "figures": {"a": 1}}}))
    with pytest.raises(ValueError, match="'x' lacks arxiv, setting, statement, unit"):
        published.load(broken)


@pytest.mark.parametrize("notebook, keys", [
    ("06a_deep_dive_qlora_memory.ipynb", ["raschka-lora-qlora"]),
    ("07_beyond_bitsandbytes.ipynb", ["gptq-table-3", "awq-table-4", "llama-cpp-bits", "llama-cpp-kl"]),
])
def test_notebook_panels_print_once_in_the_cell_that_measures(notebook, keys):
    """Each panel's citation appears exactly once in the committed output of the cell that calls it (a cell that
    ended with a bare ``panel(...)`` call would print it twice), and that cell computes what the panel says."""
    import nbformat

    from helpers.runner import NOTEBOOK_DIR

    cells = nbformat.read(NOTEBOOK_DIR / notebook, as_version=4).cells
    for key in keys:
        calling = [c for c in cells if c.cell_type == "code" and f'published.panel("{key}"' in c.source]
        assert len(calling) == 1, f"{notebook}: {key} is printed by {len(calling)} cells"
        printed = "".join(o.get("text", "") for o in calling[0].outputs if o.output_type == "stream")
        assert printed.count(f"Published ({published.get(key).citation}):") == 1
        assert "This course: " in printed and "What differs: " in printed
