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
            "02.3": lambda: {"x": _planted_activations()}, "03.2": lambda: {"weight": _TINY_UP_PROJ},
            "03a.2": lambda: {"layer": _TINY_UP_PROJ_LAYER}, "04.1": lambda: {"model": _meta("tiny")},
            "06.1": lambda: {"model": _meta("tiny"), "lora_config": _tiny_lora_config()},
            "06.2": lambda: {"settings": _tiny_settings()}, "06a.2": lambda: {"model": _tiny_with_lora()},
            "06a.3": lambda: {"residual": _residual_with_structure(), "lora_config": _tiny_lora_config(r=8)},
            }.get(key, dict)()  # the names defined further down are looked up when a test runs


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


# --- notebook 03 ------------------------------------------------------------------------------------------------

def _fp4_in_value_order():
    return solutions.exercise_03_1().sort().values


def _fp4_unnormalized():
    return solutions.exercise_03_1() * 12


def _fp4_sign_in_bit_0():  # the first eight codes all positive is bitsandbytes' layout; this mixes signs in
    table = solutions.exercise_03_1()
    return table.abs() * torch.tensor([1.0, -1.0] * 8)


def _fp4_exponent_rising():
    magnitudes = [0.0625 * (c & 1) if c >> 1 == 0 else (1 + (c & 1) / 2) * 2.0 ** ((c >> 1) - 1) for c in range(8)]
    table = torch.tensor(magnitudes + [-m for m in magnitudes])
    return table / table.abs().max()


_TINY_UP_PROJ = torch.zeros(256, 768)  # the shape of the tiny model's up_proj, the layer 03 quantizes by hand

WRONG.update({
    "03.1": [(_fp4_in_value_order, "code order"), (_fp4_unnormalized, "divide every value"),
             (_fp4_sign_in_bit_0, "highest bit"), (_fp4_exponent_rising, "wrong way"),
             (lambda: None, "forget `return`"), (lambda: torch.zeros(8), "16 codes"),
             (lambda: torch.linspace(-1, 1, 16), "some values differ")],
    "03.2": [(3072, "number of scales"), (6144, "not 16 bits"), (1024, "one scale per row"), (98304, "packed codes"),
             (98304, "in bits"), (5000, "count the blocks")],
    "03.3": [(4.25, "without double quantization"), (0.0634765625, "scales alone"),
             (4 + 8 / 64 + 32 / (64 * 256), "blocks of 64"), (4.0625, "float32 scales of their own"),
             (4 + 8 / 128 + 32 / 256, "shared by 256 blocks"), (4.5, "add up per weight")],
})


def test_notebook_03s_exercises_hold_on_every_reference_config_and_accept_any_route():
    import bitsandbytes.functional as bnb_functional

    assert torch.equal(solutions.exercise_03_1(), bnb_functional.get_4bit_type("fp4", device="cpu"))
    listed = solutions.exercise_03_1().tolist()  # a plain list of 16 numbers is a table too
    assert exercises.grade("03.1", lambda: listed).status == RIGHT
    for name in ("tiny", "llama-3.2-3b", "llama-3.1-8b"):
        weight = _meta(name).model.layers[0].mlp.up_proj.weight
        assert exercises.grade("03.2", solutions.exercise_03_2(weight), weight=weight).status == RIGHT
    from helpers import quantization

    assert exercises.grade("03.3", quantization.bits_per_parameter(128, double_quant=True)).status == RIGHT


# --- notebook 03a -----------------------------------------------------------------------------------------------

def _largest_layer_sum(config, dtype):  # every Linear of a layer at once
    return sum(o * i for o, i in memory.linear_shapes(config).values()) * torch.empty((), dtype=dtype).element_size()


def _always_16_bit(config, dtype):
    return solutions.exercise_03a_3(config, torch.float16)


def _q_proj_only(config, dtype):
    return config.hidden_size ** 2 * torch.empty((), dtype=dtype).element_size()


_TINY_UP_PROJ_LAYER = torch.nn.Linear(768, 256, bias=False, device="meta")  # out_features 256, in_features 768

WRONG.update({
    "03a.1": [((torch.bfloat16,) * 3, "is_bf16_supported"), ((torch.float32, torch.bfloat16, torch.bfloat16), "CPU"),
              ((torch.float16, torch.float16, torch.bfloat16), "an RTX 3090"),
              (("float16", "bfloat16", "float16"), "an H100")],
    "03a.2": [(98304, "packed 4-bit codes"), (786432, "float32 copy"), (196608, "one byte a weight"),
              (3145728, "in bits"), (12288, "absmax"), (1000, "out_features x in_features")],
    "03a.3": [(_largest_layer_sum, "adds up every Linear"), (_always_16_bit, "follow `dtype`"),
              (_q_proj_only, "MLP's matrices are larger"), (lambda config, dtype: None, "forget `return`"),
              (lambda config, dtype: 1000, "the bytes are off")],
})


def test_notebook_03as_exercises_follow_the_course_rule_and_the_memory_plan():
    from helpers import models
    from helpers.environment import A100_40GB, T4

    assert exercises.grade("03a.1", ["float16", "torch.bfloat16", torch.bfloat16]).status == RIGHT  # names work too
    assert models.compute_dtype_for(T4)[0] == torch.float16 and models.compute_dtype_for(A100_40GB)[0] == torch.bfloat16
    assert exercises.grade("03a.3", memory.dense_copy_bytes).status == RIGHT  # the course's own function is a route
    for name in ("tiny", "llama-3.2-3b", "llama-3.1-8b"):
        layer = _meta(name).model.layers[0].mlp.down_proj
        assert exercises.grade("03a.2", solutions.exercise_03a_2(layer), layer=layer).status == RIGHT


# --- notebook 04 ------------------------------------------------------------------------------------------------

def _update_unscaled(x, weight, lora_A, lora_B, lora_alpha, r):
    return x @ weight.T + (x @ lora_A.T) @ lora_B.T


def _rslora_forward(x, weight, lora_A, lora_B, lora_alpha, r):
    return x @ weight.T + lora_alpha / r**0.5 * (x @ lora_A.T) @ lora_B.T


def _update_alone(x, weight, lora_A, lora_B, lora_alpha, r):
    return lora_alpha / r * (x @ lora_A.T) @ lora_B.T


def _weight_not_transposed(x, weight, lora_A, lora_B, lora_alpha, r):  # right only for a square layer
    return x @ weight + lora_alpha / r * (x @ lora_A.T) @ lora_B.T


WRONG.update({  # the tiny model's down_proj: 768 -> 256; Llama-3.2-3B: 28 layers, 3072 wide, 8 of 24 heads for k/v
    "04.1": [(((768, 8), (8, 256)), "(out_features, in_features)"), (((8, 256), (768, 8)), "the wide side"),
             (((256, 8), (8, 768)), "lora_A comes first"), (((32, 768), (256, 32)), "one dimension of each"),
             (((8, 700), (256, 8)), "read the layer's in_features")],
    "04.2": [((16 / 8, 16 / 64), "swapped"), ((64 / 16, 8 / 16), "lora_alpha goes on top"),
             ((16 / 64, 16 / 64), "square root of r"), ((16, 2), "plain LoRA multiplies"), ((0.25, 4), "square root")],
    "04.3": [(9_175_040, "attention only"), (868_352, "one decoder layer"), (28 * (868_352 + 2 * 16 * (3072 - 1024)), "narrower than q_proj"),
             (24_313_856 + 16 * (3072 + 128_256), "leaves out lm_head"), (24.313856, "not in millions"),
             (1_000_000, "for each of the seven projections")],
    "04.4": [(_update_unscaled, "multiplied by the scaling"), (_rslora_forward, "rsLoRA's scaling"),
             (_update_alone, "the update alone"), (_weight_not_transposed, "raised RuntimeError"),
             (lambda x, weight, lora_A, lora_B, lora_alpha, r: x @ weight.T, "base layer's output alone"),
             (lambda *arguments: None, "forget `return`"),
             (lambda x, weight, lora_A, lora_B, lora_alpha, r: x @ weight.T + 0.5 * x @ weight.T, "output differs")],
})


def test_any_correct_way_is_accepted_in_notebook_04():
    from helpers import lora

    down_proj = _meta("tiny").model.layers[0].mlp.down_proj
    as_sizes = [torch.Size([8, down_proj.in_features]), [down_proj.out_features, 8.0]]
    assert exercises.grade("04.1", as_sizes, model=_meta("tiny")).status == RIGHT
    assert exercises.grade("04.2", [0.25, torch.tensor(2.0)]).status == RIGHT
    config = memory.load_reference_config(runner.REPO_ROOT / "data" / "reference" / "llama-3.2-3b.config.json")
    assert exercises.grade("04.3", lora.lora_param_count(config, 16, memory.LINEAR_NAMES)).status == RIGHT

    def merged_first(x, weight, lora_A, lora_B, lora_alpha, r):  # W + (alpha / r) B @ A, then one matmul
        return torch.nn.functional.linear(x, weight + lora_alpha / r * lora_B @ lora_A)

    assert exercises.grade("04.4", merged_first).status == RIGHT


def test_the_notebook_04_exercises_hold_on_every_reference_config():
    for name in ("tiny", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        model = _meta(name)
        assert exercises.grade("04.1", solutions.answer("04.1", model=model), model=model).status == RIGHT, name


# --- notebook 06 ------------------------------------------------------------------------------------------------

def _tiny_lora_config(r=32, alpha=64, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM")


def _tiny_settings():
    from helpers import lora

    return lora.training_settings("tiny", torch.float32, on_gpu=False)


_TINY_LORA = 344_064  # the tiny model's LoRA parameters at r = 32 on q, k, v, o (notebook 06 prints them)
_TINY_BASE = 6_819_072


def _epoch_ends_from_0(n_items, batch_size, steps):
    return [step - 1 for step in solutions.exercise_06_3(n_items, batch_size, steps)]


def _epoch_ends_every_full_pass(n_items, batch_size, steps):
    per_pass = -(-n_items // batch_size)
    return [step for step in range(1, steps + 1) if step % per_pass == 0]


def _every_step(n_items, batch_size, steps):
    return list(range(1, steps + 1))


WRONG.update({
    "06.1": [(100 * _TINY_LORA / _TINY_BASE, "includes the LoRA matrices"),
             (_TINY_LORA / (_TINY_BASE + _TINY_LORA), "a percentage"),
             (100 * _TINY_LORA / (_TINY_BASE - 6 * 786_432 // 2 + _TINY_LORA), "packed bytes"),
             (100 * 2 * _TINY_LORA / (_TINY_BASE + 2 * _TINY_LORA), "lora_alpha only scales"),
             (3.0, "count LoRA's parameters")],
    "06.2": [(0.0, "starts at 0"), (2e-3, "once the warm-up is over"), (2e-3 / 4, "warmup_steps in"),
             (1e-4, "grows linearly")],
    "06.3": [(_epoch_ends_from_0, "one too early"), (_epoch_ends_every_full_pass, "the steps drift"),
             (_every_step, "more steps than passes end"), (lambda n, b, s: None, "forget `return`"),
             (lambda n, b, s: [s], "some steps differ")],
})


# --- notebook 06a -----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tiny_with_lora():
    from peft import get_peft_model

    return get_peft_model(memory.meta_model(runner.REPO_ROOT / "data" / "tiny-llama" / "config.json"),
                          _tiny_lora_config())


def _residual_with_structure():  # noise plus a strong rank-4 part: its top directions hold more than noise's
    noise = environment.portable_randn(128, 96, seed=6)
    return noise + 3 * environment.portable_randn(128, 4, seed=7) @ environment.portable_randn(4, 96, seed=8)


_TINY_32_BIT = 8 * _TINY_LORA
_TINY_8_BIT = 2 * _TINY_LORA + 8 * (_TINY_LORA // 256) + 2048  # every tiny LoRA tensor has >= 4096 values, /256


def _ratio(share, scaling=1.5):
    return (1 - share + (1 - scaling) ** 2 * share) ** 0.5


_SHARE = exercises._energy_in_top(_residual_with_structure(), 8)  # of the planted residual's energy, in its top 8


WRONG.update({
    "06a.1": [(256, "try a smaller rank"), (512, "try a smaller rank"), (64, "try larger"), (16, "try larger"),
              (100, "powers of two")],
    "06a.2": [((_TINY_32_BIT, 2 * _TINY_LORA + 2048), "need their scales"),
              ((_TINY_32_BIT, _TINY_8_BIT - 2048), "code books"), ((_TINY_32_BIT, 2 * _TINY_LORA), "codes alone"),
              ((_TINY_32_BIT, _TINY_LORA), "two moments"), ((4 * _TINY_LORA, _TINY_8_BIT), "two moments per value"),
              ((16 * _TINY_LORA, _TINY_8_BIT), "optimizer's states only"),
              ((_TINY_32_BIT / 1e6, _TINY_8_BIT), "in bytes"), ((_TINY_32_BIT, 1000), "the 32-bit figure is right"),
              ((1000, 1000), "the 32-bit figure is off")],
    "06a.3": [(1.0, "only at scaling 2"), ((1 - _SHARE) ** 0.5, "divides by"), (_ratio(_SHARE) ** 2, "square root"),
              ((1 - 0.5 * _SHARE) ** 0.5, "squared times"), (0.1, "orthogonal")],
})


def test_notebook_06s_checkers_agree_with_peft_and_the_course_on_every_reference_config():
    from peft import get_peft_model

    from helpers import lora

    for name in ("tiny", "llama-3.2-3b", "llama-3.1-8b"):
        for config in (_tiny_lora_config(), _tiny_lora_config(r=16, alpha=16, targets=exercises.ALL_LINEAR)):
            base = _meta(name)
            wrapped = get_peft_model(memory.meta_model(runner.REPO_ROOT / "data" / (
                "tiny-llama/config.json" if name == "tiny" else f"reference/{name}.config.json")), config)
            trainable, everything = wrapped.get_nb_trainable_parameters()
            answer = solutions.exercise_06_1(base, config)
            assert answer == pytest.approx(100 * trainable / everything, rel=1e-12), (name, config.r)
            assert exercises.grade("06.1", answer, model=base, lora_config=config).status == RIGHT
            sizes = lora.lora_tensor_sizes(base.config, config.r, sorted(config.target_modules))
            assert solutions.exercise_06a_2(wrapped) == tuple(
                lora.optimizer_state_memory(sizes, optimizer).total for optimizer in ("adamw", "adamw8bit"))
    assert exercises.grade("06.1", 4.8033, **context("06.1")).status == RIGHT  # the value the notebook prints
    settings = _tiny_settings()
    assert exercises.grade("06.2", settings.learning_rate_at(0), settings=settings).status == RIGHT
    for case in exercises.EPOCH_CASES:
        assert solutions.exercise_06_3(*case) == lora.epoch_ends(*case) == exercises._epoch_ends_by_counting(*case)
    assert exercises.grade("06.3", lora.epoch_ends).status == RIGHT  # the course's own function is a route


def test_notebook_06as_checkers_measure_what_the_notebook_computes():
    from helpers import lora

    assert exercises._qlora_8b_fits_a_t4(solutions.exercise_06a_1())
    assert not exercises._qlora_8b_fits_a_t4(2 * solutions.exercise_06a_1())
    residual, config = _residual_with_structure(), _tiny_lora_config(r=8)
    assert solutions.exercise_06a_3(residual, config) == pytest.approx(
        lora.loftq_error_ratio_formula(residual, 8, 1.5), abs=1e-6)
    share = _SHARE
    assert share > 0.5  # the planted rank-4 part: the hints' values are far apart
    assert exercises.grade("06a.3", round(_ratio(share), 3), residual=residual, lora_config=config).status == RIGHT


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
