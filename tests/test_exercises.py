"""The exercise machinery: every checker accepts its worked solution, rejects a typical wrong answer with a hint that
does not give the answer away, greets an unattempted answer politely, and the committed notebooks are unattempted."""

import functools
import re

import nbformat
import pytest
import torch

from helpers import environment, exercises, memory, runner, solutions
from helpers.exercises import NOT_ATTEMPTED, NOT_YET, RIGHT


def _per_row_scales(weight, group_size, bits):  # forgot the groups
    return weight.abs().amax(dim=1) / (2 ** (bits - 1) - 1)


def _scales_over_128(weight, group_size, bits):  # divided by 2**(bits-1): absmax's largest code is one less
    return weight.reshape(weight.shape[0], -1, group_size).abs().amax(-1) / 2 ** (bits - 1)


def _groups_down_the_columns(weight, group_size, bits):
    return weight.t().reshape(-1, group_size).abs().amax(-1) / (2 ** (bits - 1) - 1)


def _forgot_return(weight, group_size, bits):
    weight.reshape(weight.shape[0], -1, group_size).abs().amax(-1) / (2 ** (bits - 1) - 1)


def _not_written_yet(*arguments):
    raise NotImplementedError


@functools.lru_cache(maxsize=None)
def _meta(name):  # a model with real shapes and no storage: the checkers read shapes and footprints only
    folder = "tiny-llama/config.json" if name == "tiny" else f"reference/{name}.config.json"
    return memory.meta_model(runner.REPO_ROOT / "data" / folder)


def _planted_activations():  # tokens x features with one outlier feature, |x| from 7 to 80, as 02's planted layer gets
    x = environment.portable_randn(64, 32, seed=5)
    x[:, 7] = torch.linspace(7, 80, 64) * torch.tensor([1.0, -1.0]).repeat(32)
    return x


def context(key):
    """What the notebook passes with the answer, for the exercises that need it (EXERCISES[key].context)."""
    return {"01.1": lambda: {"model": _meta("tiny")}, "01.3": lambda: {"model": _meta("tiny")},
            "02.3": lambda: {"x": _planted_activations()}}.get(key, dict)()


# typical wrong answers to notebook 01's exercises (the tiny model: 6 layers, 2 of 4 heads for keys and values)
def _without_norms(config):
    return solutions.exercise_01_2(config) - 2 * config.hidden_size


def _without_gqa(config):
    hidden = config.hidden_size
    return 4 * hidden * hidden + 3 * hidden * config.intermediate_size + 2 * hidden


def _two_matrix_mlp(config):
    return solutions.exercise_01_2(config) - config.hidden_size * config.intermediate_size


def _every_layer(config):
    return config.num_hidden_layers * solutions.exercise_01_2(config)


# ... to notebook 02's
def _one_scale_for_all(weight):
    copy16 = weight.half().float()
    scale = copy16.abs().max()
    return torch.round(copy16 * 127 / scale).to(torch.int8), scale.reshape(1)


def _float32_absmax(weight):
    scales = weight.abs().amax(dim=1)
    return torch.round(weight * (127 / scales).unsqueeze(1)).to(torch.int8), scales


def _step_as_scale(weight):
    codes, scales = solutions.exercise_02_1(weight)
    return codes, scales / 127


def _truncated(weight):
    copy16 = weight.half().float()
    scales = copy16.abs().amax(dim=1)
    return (copy16 * (127 / scales).unsqueeze(1)).to(torch.int8), scales


def _int64_codes(weight):
    codes, scales = solutions.exercise_02_1(weight)
    return codes.long(), scales


# ... to notebook 05's
def _first_code_highest(codes):
    groups = codes.reshape(*codes.shape[:-1], -1, 10).flip(-1)  # each ten reversed: the first code lands highest
    return solutions.exercise_05_2(groups.reshape(codes.shape))


def _shifted_in_uint8(codes):
    groups = codes.reshape(*codes.shape[:-1], -1, 10)
    return (groups << torch.arange(0, 30, 3, dtype=torch.uint8)).to(torch.int32).sum(dim=-1, dtype=torch.int32)


def _all_rows_in_one(codes):
    return solutions.exercise_05_2(codes).reshape(-1)


def _int64_words(codes):
    return solutions.exercise_05_2(codes).long()


def _low_nibble_first(packed, shape):
    flat = packed.reshape(-1)
    return torch.stack((flat & 0xF, flat >> 4), dim=1).reshape(-1)[: shape.numel()].reshape(shape)


def _padding_kept(packed, shape):
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)


def _not_reshaped(packed, shape):
    return solutions.exercise_05_4(packed, shape).reshape(-1)


def _low_nibble_unmasked(packed, shape):
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat), dim=1).reshape(-1)[: shape.numel()].reshape(shape)


WRONG = {  # exercise: [(a typical wrong answer, words its hint must contain)]
    "00.1": [(torch.finfo(torch.float16).eps, "spacing near 1.0"), (1.0, "1.something x 2**e"),
             (1000 * torch.finfo(torch.float16).eps, "powers of two")],
    "00.2": [((7, 0.5), "absmax"), ((8, 3.5 / 8), "n - 1 gaps"), ((9, 0.5), "count the different codes"),
             ((8, 0.4), "spread the whole range")],
    "00.3": [(_per_row_scales, "expected one per group"), (_scales_over_128, "2**(bits - 1) - 1"),
             (_groups_down_the_columns, "consecutive weights of one row"), (_forgot_return, "forget `return`"),
             (lambda w, g, b: w[:, ::g] * 0 + 1, "some scales differ")],
    "00.4": [(128, "try smaller groups"), (256, "try smaller groups"), (32, "try larger ones"),
             (8, "try larger ones"), (100, "try powers of two")],
    "01.1": [(1536, "keys *and* values"), (6144, "kept in 16-bit"), (6144, "without GQA"), (512, "one layer's share"),
             (3000, "count, for one token")],
    "01.2": [(_without_norms, "RMSNorm weights"), (_without_gqa, "narrower than q_proj"),
             (_two_matrix_mlp, "three matrices"), (_every_layer, "not all num_hidden_layers"),
             (lambda config: None, "forget `return`"), (lambda config: 1000, "the count is off")],
    "01.3": [(27_276_288, "named_buffers"), (6_819_072, "counts numbers"), (13_638_144, "loaded in float32"),
             (27.276544, "in bytes"), (27_000_000, "add up the bytes")],
    "01.4": [(12, "try more"), (19, "try more"), (21, "find the smallest"), (64, "find the smallest"),
             (0.5, "whole numbers"), (200, "whole numbers")],
    "02.1": [(_one_scale_for_all, "one per output row"), (_float32_absmax, "float16 copy"),
             (_step_as_scale, "absmax itself"), (_truncated, "truncated towards 0"), (_int64_codes, "torch.int8"),
             (lambda weight: solutions.exercise_02_1(weight)[0], "two tensors"), (lambda weight: None, "forget"),
             (lambda weight: (weight.abs().amax(0), weight.abs().amax(0)), "one per output row")],
    "02.2": [(5, "counts values"), (5, "5.9 is below"), (3, "counts rows"), (3, "the sign does not matter"),
             (3, "exactly the threshold"), (8, "count the columns")],
    "02.3": [(6, "try larger"), (8, "try larger"), (128, "try smaller"), (1, "more columns join"),
             (5, "powers of two")],
    "05.1": [((1, 3, 6, 13), "still a whole byte"), ((1.625, 3.25, 6.5, 13), "bytes come whole"),
             ((13, 26, 52, 104), "those are bits"), ((8, 4, 2, 1), "fit in one byte"),
             ((2, 4, 6, 13), "one of the four")],
    "05.2": [(_first_code_highest, "the order is reversed"), (_shifted_in_uint8, "widen the codes to int32"),
             (_all_rows_in_one, "the other dimensions stay"), (_int64_words, "should be torch.int32"),
             (lambda codes: None, "forget `return`"), (lambda codes: solutions.exercise_05_2(codes) + 1, "some words")],
    "05.4": [(_low_nibble_first, "wrong order"), (_padding_kept, "one code too many"),
             (_not_reshaped, "reshape the codes"), (_low_nibble_unmasked, "above 15"),
             (lambda packed, shape: None, "forget `return`"),
             (lambda packed, shape: solutions.exercise_05_4(packed, shape).flip(-1), "some codes differ")],
    "05.3": [(64, "try larger"), (128, "try larger"), (512, "try smaller"), (4096, "try smaller"),
             (100, "powers of two from 32")],
}


def test_every_exercise_has_a_solution_and_typical_wrong_answers():
    assert set(exercises.EXERCISES) == set(solutions.KEYS) == set(WRONG)


@pytest.mark.parametrize("key", solutions.KEYS)
def test_the_solution_is_right(key, capsys):
    verdict = exercises.grade(key, solutions.answer(key, **context(key)), **context(key))
    assert verdict.status == RIGHT, verdict.message
    exercises.check(key, solutions.answer(key, **context(key)), **context(key))
    out, err = capsys.readouterr()
    assert out.startswith(f"✓ Exercise {key}: right. ") and err == ""


@pytest.mark.parametrize("key", solutions.KEYS)
def test_typical_wrong_answers_get_their_hint_and_never_the_answer(key, capsys):
    right = solutions.answer(key, **context(key))
    revealing = [] if callable(right) else [str(v) for v in (right if isinstance(right, tuple) else (right,))]
    for answer, hint in WRONG[key]:
        verdict = exercises.grade(key, answer, **context(key))
        assert verdict.status == NOT_YET and hint in verdict.message, (answer, verdict)
        for text in revealing:  # the right value never appears in a hint
            assert not re.search(rf"(?<![\d.]){re.escape(text)}(?![\d])", verdict.message), (text, verdict.message)
        exercises.check(key, answer, **context(key))  # shown, not raised: the notebook goes on
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"✗ Exercise {key}, not yet: ")


@pytest.mark.parametrize("key", solutions.KEYS)
def test_unattempted_answers_get_a_polite_note(key, capsys):
    placeholders = [..., None] + ([_not_written_yet] if exercises.EXERCISES[key].kind == "function" else [])
    for placeholder in placeholders:
        assert exercises.grade(key, placeholder, **context(key)).status == NOT_ATTEMPTED
        exercises.check(key, placeholder, **context(key))
        out, err = capsys.readouterr()
        assert out.startswith(f"Exercise {key} not attempted yet: replace the ") and out.endswith("again.\n")
        assert err == ""


def test_any_correct_way_is_accepted():
    assert exercises.grade("00.1", 2.0**-1).status == RIGHT
    assert exercises.grade("00.1", torch.tensor(0.5, dtype=torch.float16)).status == RIGHT
    assert exercises.grade("00.2", [8.0, 3.5 / 7]).status == RIGHT

    def with_view_and_max(weight, group_size, bits):  # another way: a 3-D view and max over its last dimension
        groups = weight.view(weight.shape[0], weight.shape[1] // group_size, group_size)
        return torch.max(groups.abs(), dim=2).values * (1.0 / (2 ** (bits - 1) - 1))

    def flat_list_of_scales(weight, group_size, bits):  # the right scales, flat
        return weight.reshape(-1, group_size).abs().amax(-1) / (2 ** (bits - 1) - 1)

    assert exercises.grade("00.3", with_view_and_max).status == RIGHT
    assert exercises.grade("00.3", flat_list_of_scales).status == RIGHT


def test_any_correct_way_is_accepted_in_notebooks_01_02_05():
    from helpers import packing, quantization

    assert exercises.grade("01.1", 3072.0, model=_meta("tiny")).status == RIGHT
    assert exercises.grade("01.2", lambda c: sum(o * i for o, i in memory.linear_shapes(c).values())
                           + 2 * c.hidden_size).status == RIGHT
    assert exercises.grade("01.3", torch.tensor(27_276_544), model=_meta("tiny")).status == RIGHT
    assert exercises.grade("02.1", quantization.quantize_int8_rowwise).status == RIGHT

    def dividing_by_the_step(weight):  # another order of operations: a code may round the other way only on a tie
        copy16 = weight.half().float()
        scales = copy16.abs().amax(dim=1, keepdim=True)
        return torch.round(copy16 / (scales / 127)).to(torch.int8), scales.half()

    assert exercises.grade("02.1", dividing_by_the_step).status == RIGHT
    assert exercises.grade("02.2", 4.0).status == RIGHT
    assert exercises.grade("05.1", [2.0, 4, 7, 13]).status == RIGHT

    def summing_powers_of_eight(codes):  # a sum of code * 8**k is the same word as an OR of shifts
        groups = codes.long().reshape(*codes.shape[:-1], -1, 10)
        return (groups * 8 ** torch.arange(10)).sum(dim=-1).to(torch.int32)

    def with_the_helper(packed, shape):
        return packing.unpack_bitsandbytes_4bit(packed, shape)

    assert exercises.grade("05.2", summing_powers_of_eight).status == RIGHT
    assert exercises.grade("05.4", with_the_helper).status == RIGHT


def test_the_kv_cache_hints_tell_16_bit_from_gqa_on_a_real_config():
    llama_3b = _meta("llama-3.2-3b")  # 3 query heads per key/value head: float32 and no-GQA are different mistakes
    right = solutions.exercise_01_1(llama_3b)
    assert exercises.grade("01.1", right, model=llama_3b).status == RIGHT
    float32 = exercises.grade("01.1", 2 * right, model=llama_3b).message
    no_gqa = exercises.grade("01.1", 3 * right, model=llama_3b).message
    assert "16-bit" in float32 and "GQA" not in float32 and "without GQA" in no_gqa and "16-bit" not in no_gqa


def test_the_exercises_on_the_model_hold_on_every_reference_config():
    for name in ("tiny", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        model = _meta(name)
        for key in ("01.1", "01.3"):
            assert exercises.grade(key, solutions.answer(key, model=model), model=model).status == RIGHT, (key, name)
        assert solutions.exercise_01_2(model.config) == exercises.decoder_layer_size(model.config)


def test_the_knob_exercises_measure_what_the_notebooks_print():
    assert "disk" in exercises.offload_plan(memory.T4_LIMITS.cpu_bytes // 10**9).values()  # 01: Colab spills
    assert "disk" not in exercises.offload_plan(solutions.exercise_01_4()).values()
    x = _planted_activations()
    assert exercises.float_path_columns(x, 6.0) == (7,) == exercises.float_path_columns(x, solutions.exercise_02_3(x))
    assert exercises.float_path_columns(x, 2 * solutions.exercise_02_3(x)) == ()
    from helpers import quantization  # 05: the knob cell prints helpers.quantization's bits, the checker counts its own
    for blocksize in exercises.BLOCK_SIZES:
        for double_quant in (False, True):
            assert quantization.bits_per_parameter(blocksize, double_quant) == pytest.approx(
                4 + exercises.scale_bits_per_weight(blocksize, double_quant), rel=1e-12)


def test_the_toy_activations_take_the_columns_bitsandbytes_takes():
    import bitsandbytes.functional as bnb_functional

    toy = exercises.toy_activations()
    _, _, columns = bnb_functional.int8_vectorwise_quant(toy.half(), threshold=exercises.LLM_INT8_THRESHOLD)
    assert tuple(columns.tolist()) == exercises.float_path_columns(toy, exercises.LLM_INT8_THRESHOLD) == (2, 3, 4, 5)


def test_the_context_must_be_the_exercises_own():
    with pytest.raises(TypeError, match=r'exercises.check\("01.1", your_answer, model=model\)'):
        exercises.grade("01.1", 3072)
    with pytest.raises(TypeError, match="nothing besides the answer"):
        exercises.grade("00.1", 0.5, model=None)


def test_an_answer_of_the_wrong_kind_is_a_hint_not_a_crash():
    assert exercises.grade("00.1", "half").status == NOT_YET
    assert exercises.grade("00.2", 8).status == NOT_YET
    assert exercises.grade("00.3", 0.5).status == NOT_YET
    raised = exercises.grade("00.3", lambda w, g, b: 1 / 0)
    assert raised.status == NOT_YET and raised.message.startswith("running your answer raised ZeroDivisionError")
    with pytest.raises(KeyError, match="no exercise"):
        exercises.grade("99.9", 1)


def test_the_lesson_never_imports_the_solutions():
    for path in runner.course_notebooks():
        assert "solutions" not in "".join(cell.source for cell in nbformat.read(path, as_version=4).cells
                                          if cell.cell_type == "code"), path.name


def test_the_knob_exercise_measures_what_the_notebook_prints():
    error, clean = exercises.outlier_experiment(solutions.exercise_00_4())
    assert error <= clean
    assert exercises.outlier_experiment(2 * solutions.exercise_00_4())[0] > clean


def test_registering_twice_or_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        exercises.exercise("00.1", "predict", "again")(lambda answer: None)
    with pytest.raises(ValueError, match="kind must be one of"):
        exercises.exercise("x", "essay", "?")


EXERCISE_CALL = re.compile(r'exercises\.check\("(\d\d[a-z]?\.\d)"')


def _note(key):
    return f"Exercise {key} not attempted yet: {exercises.grade(key, ..., **context(key)).message}.\n"


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_committed_notebooks_leave_every_exercise_unattempted(path):
    """A committed notebook shows the polite note for each exercise, last in its cell (the exercise's prompt code may
    print before it): no answer is given away in the lesson."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        keys = EXERCISE_CALL.findall(cell.source) if cell.cell_type == "code" else []
        assert len(keys) <= 1, f"one exercise per cell: {keys}"
        for key in keys:
            assert key.split(".")[0] == runner.notebook_key(path) and key in exercises.EXERCISES, key
            assert all(o.get("name") != "stderr" for o in cell.outputs), key
            text = "".join(o.get("text", "") for o in cell.outputs)
            assert text.endswith(_note(key)) and text.count("not attempted yet") == 1, (key, text)


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_every_exercise_of_a_notebook_is_posed_in_it_once_and_in_order(path):
    """The checkers of notebook NN are the exercises NN.1, NN.2, ... its cells call, each once, in that order; a
    notebook with exercises has at least three."""
    calls = [key for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
             for key in EXERCISE_CALL.findall(cell.source)]
    prefix = runner.notebook_key(path)
    registered = [key for key in exercises.EXERCISES if key.split(".")[0] == prefix]
    assert calls == sorted(registered, key=lambda k: int(k.split(".")[1])) == [f"{prefix}.{n}" for n in
                                                                                 range(1, len(calls) + 1)]
    assert not calls or len(calls) >= 3


# --- notebook 07 ------------------------------------------------------------------------------------------------

def _q4_0_style(x):  # Q4_0's signed extreme kept, with a minimum slotted in: d differs
    blocks = x.float().reshape(-1, 32)
    low = blocks.amin(1, keepdim=True)
    d = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)) / -8
    codes = torch.trunc((blocks - low) / d + 0.5).clamp(0, 15).to(torch.uint8)
    raw = torch.cat([d.half().view(torch.uint8), low.half().view(torch.uint8), codes[:, :16] | (codes[:, 16:] << 4)], 1)
    return raw.reshape(*x.shape[:-1], -1)


def _d_and_m_swapped(x):
    raw = solutions.exercise_07_3(x).reshape(-1, 20)
    return torch.cat([raw[:, 2:4], raw[:, :2], raw[:, 4:]], 1).reshape(*x.shape[:-1], -1)


def _high_nibbles_first(x):
    raw = solutions.exercise_07_3(x).reshape(-1, 20)
    codes = raw[:, 4:]
    return torch.cat([raw[:, :4], (codes >> 4) | (codes << 4)], 1).reshape(*x.shape[:-1], -1)


def _minimum_in_float32_bytes(x):  # m stored as the float32's low bytes: the block is too long
    raw = solutions.exercise_07_3(x).reshape(-1, 20)
    low = x.float().reshape(-1, 32).amin(1, keepdim=True).view(torch.uint8)
    return torch.cat([raw[:, :2], low, raw[:, 4:]], 1).reshape(*x.shape[:-1], -1)


def _codes_floored(x):  # floor instead of rounding to the nearest code
    blocks = x.float().reshape(-1, 32)
    raw = solutions.exercise_07_3(x).reshape(-1, 20).clone()
    low = blocks.amin(1, keepdim=True)
    d = (blocks.amax(1, keepdim=True) - low) / 15
    codes = torch.floor((blocks - low) * torch.where(d == 0, 0, 1 / d)).clamp(0, 15).to(torch.uint8)
    raw[:, 4:] = codes[:, :16] | (codes[:, 16:] << 4)
    return raw.reshape(*x.shape[:-1], -1)


WRONG.update({
    "07.1": [(4.125, "count the zero point too"), (4.15625, "not a packed 4-bit code"), (4.5, "not 64"),
             (4.3125, "the format measured above"), (4, "the codes alone"), (0.25, "add the codes' own bits"),
             (5, "divided among the weights")],
    "07.2": [(1, "one level more below zero"), (0.333, "the share lost"), (1 / 3, "the share lost"),
             (0.933, "the 4-bit share"), (6 / 7, "the 3-bit share"), (0.5, "half a step past"),
             (0.75, "in steps, and divide")],
    "07.3": [(_q4_0_style, "d (bytes 0-1 of each block) differs"), (_d_and_m_swapped, "d and m are swapped"),
             (_high_nibbles_first, "wrong order"), (_minimum_in_float32_bytes, "it returned shape"),
             (_codes_floored, "some codes differ"), (lambda x: None, "forget `return`"),
             (lambda x: solutions.exercise_07_3(x).long(), "torch.uint8")],
})


def test_any_correct_way_is_accepted_in_notebook_07():
    assert exercises.grade("07.1", 4.25).status == RIGHT
    assert exercises.grade("07.2", 0.667).status == RIGHT and exercises.grade("07.2", 2 / 3).status == RIGHT

    def with_round(x):  # round-half-even instead of trunc(+0.5), and a division: same codes off exact ties
        blocks = x.float().reshape(-1, 32)
        low, high = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
        d = (high - low) / 15
        codes = torch.nan_to_num(torch.round((blocks - low) / d)).clamp(0, 15).to(torch.uint8)
        head = torch.cat([d.half(), low.half()], 1).view(torch.uint8)
        return torch.cat([head, codes[:, :16] + 16 * codes[:, 16:]], 1).reshape(*x.shape[:-1], -1)

    assert exercises.grade("07.3", with_round).status == RIGHT


def test_the_notebook_07_checkers_measure_what_the_notebook_prints():
    from helpers import groupwise

    assert exercises.symmetric_share_kept(2) == pytest.approx(2 / 3)  # the clipping cell's claim
    low, high = groupwise.code_range(4)
    assert exercises.symmetric_share_kept(4) == pytest.approx(high / ((high - low) / 2))
    assert exercises.groupwise_bits_per_weight(4, 64, 16, 4) == groupwise.bits_per_weight_formula(4, 64, False, 16)
    x = exercises._q4_1_cases()[1]  # Q4_1: 20 bytes per block of 32, d and m in float16, as gguf-py writes them
    raw = exercises.gguf_py_q4_1(x).reshape(-1, 20)
    blocks = x.reshape(-1, 32)
    assert torch.equal(raw[:, 2:4].contiguous().view(torch.float16).flatten(), blocks.amin(1).half())
