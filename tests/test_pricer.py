"""helpers.pricer: the price rule, the splits on disk, the training encoding, parsing and scoring."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from helpers import claims, pricer
from helpers.pricer import PricerItem, Product, parse_price, price_of, score_answers


@pytest.mark.parametrize(
    ("attributes", "price"),
    [
        (("mug", "plastic", "medium", "standard"), 12),  # the base price itself
        (("backpack", "leather", "large", "premium"), 300),  # 50 x 2 x 1.5 x 2
        (("mug", "leather", "small", "budget"), 9),  # 12 x 2 x 0.75 x 0.5
        (("mug", "bamboo", "small", "budget"), 6),  # 12 x 1.25 x 0.75 x 0.5 = 5.625
        (("lamp", "bamboo", "small", "budget"), 19),  # 40 x 1.25 x 0.75 x 0.5 = 18.75
        (("t-shirt", "bamboo", "small", "budget"), 9),  # 9.375 rounds down
        (("tent", "leather", "large", "premium"), 1200),  # the most expensive product
    ],
)
def test_price_rule(attributes, price):
    assert price_of(*attributes) == price


def test_halves_round_up():
    # 12 x 1.25 x 0.75 x 2 = 22.5 becomes 23 (Python's round() would give 22).
    assert price_of("mug", "bamboo", "small", "premium") == 23


def test_colour_does_not_change_the_price():
    prices = {Product("watch", "steel", "large", "standard", color).price for color in pricer.COLORS}
    assert prices == {338}  # 150 x 1.5 x 1.5 = 337.5, rounded up


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: price_of("sofa", "steel", "large", "standard"), "Unknown category 'sofa'"),
        (lambda: price_of("mug", "gold", "large", "standard"), "Unknown material 'gold'"),
        (lambda: Product("mug", "steel", "huge", "standard", "red"), "Unknown size 'huge'"),
        (lambda: Product("mug", "steel", "large", "luxury", "red"), "Unknown brand_tier 'luxury'"),
        (lambda: Product("mug", "steel", "large", "standard", "pink"), "Unknown color 'pink'"),
        (lambda: pricer.describe(Product("mug", "steel", "large", "standard", "red"), 3), "template_index"),
        (lambda: pricer.make_prompt("  "), "description is empty"),
        (lambda: pricer.make_splits(0, 0, 5), "at least 1"),
        (lambda: pricer.make_splits(0, 5, 100_000), "too large"),
        (lambda: pricer.load_split("validation"), "Unknown split"),
        (lambda: PricerItem.from_json('{"prompt": "x"}'), "lacks the field"),
    ],
)
def test_bad_input_is_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_prompt_has_the_course_shape():
    prompt = pricer.make_prompt("Red steel mug\nSize: large. Brand: standard.")
    assert prompt == (
        "How much does this cost to the nearest dollar?\n\nRed steel mug\nSize: large. Brand: standard.\n\nPrice is $"
    )


def test_shipped_splits_are_what_the_generator_writes():
    train, test = pricer.make_splits(pricer.SPLIT_SEED, pricer.N_TRAIN, pricer.N_TEST)
    assert pricer.load_split("train") == train
    assert pricer.load_split("test") == test
    assert (len(train), len(test)) == (pricer.N_TRAIN, pricer.N_TEST)
    assert not {item.prompt for item in test} & {item.prompt for item in train}
    for item in train + test:
        product = Product(**item.attributes)
        assert item.price == product.price and item.answer == str(item.price)
        assert item.prompt.endswith(pricer.ANSWER_PREFIX)


def test_jsonl_round_trip(tmp_path):
    items = [pricer.random_item(random.Random(seed)) for seed in range(5)]
    pricer.write_jsonl(items, tmp_path / "sub" / "items.jsonl")
    assert pricer.read_jsonl(tmp_path / "sub" / "items.jsonl") == items
    with pytest.raises(FileNotFoundError, match="make_pricer_data"):
        pricer.read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("text", "price"),
    [
        ("137", 137),
        ("137\nHow much", 137),
        ("42 dollars", 42),
        ("How much ...\n\nPrice is $88", 88),
        ("Price is $5 and Price is $7", 7),
        ("", None),
        (" 137", None),
        ("1,370", None),
        ("12.5", 13),
        ("12.49", 12),
        ("137.00", 137),
        ("137.00\n\nHow much", 137),
        ("Price is $137.00", 137),
        ("$137", 137),
        ("12.505", None),
        ("137.", None),
        ("$ 137", None),
        ("137th", None),
        ("and the LORD spake", None),
    ],
)
def test_parse_price(text, price):
    assert parse_price(text) == price


def test_parse_price_rejects_non_text():
    with pytest.raises(TypeError, match="expects a str"):
        parse_price(137)


def test_scores_count_unparsable_answers_as_zero():
    scores = score_answers(["100", "oops", "250\n"], [110, 40, 200])
    assert scores.n_items == 3 and scores.n_right_format == 2
    assert scores.format_share == pytest.approx(2 / 3)
    assert scores.mean_absolute_error == pytest.approx((10 + 40 + 50) / 3)
    assert scores.mean_absolute_error_parsed == pytest.approx((10 + 50) / 2)
    assert scores.mean_true_price == pytest.approx(350 / 3)
    assert score_answers(["no"], [9]).mean_absolute_error_parsed is None
    with pytest.raises(ValueError, match="one of each"):
        score_answers(["1"], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        score_answers([], [])


@pytest.fixture(scope="module")
def tokenizer():
    # The shipped tiny model's tokenizer; /tmp/tl_test is the development checkpoint of the same tokenizer.
    for path in (pricer.SPLIT_DIR.parent / "tiny-llama", Path("/tmp/tl_test")):
        if (path / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(path)
    pytest.skip("The tiny-llama tokenizer is missing: rebuild it with data/build/train_tiny_llama.py.")


def test_training_encoding_masks_the_prompt(tokenizer):
    item = pricer.load_split("test")[0]
    input_ids, labels = pricer.encode_for_training(tokenizer, item)
    whole = tokenizer(item.prompt + item.answer)["input_ids"] + [tokenizer.eos_token_id]
    assert input_ids == whole  # splitting at "$" changes no token
    answer_length = len(item.answer) + 1  # one token per digit, then end-of-text
    assert labels[-answer_length:] == input_ids[-answer_length:]
    assert set(labels[:-answer_length]) == {pricer.IGNORE_INDEX}
    assert tokenizer.decode(input_ids[-answer_length:-1]) == item.answer

    batch = pricer.collate_for_training([(input_ids, labels), (input_ids[:5], labels[:5])], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (len(input_ids) - 5)
    assert (batch["labels"][1] == pricer.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="empty"):
        pricer.collate_for_training([], 0)


def test_answer_prices_scores_greedy_answers(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).train()  # an untrained model: its answers are noise
    items = pricer.load_split("test")[:3]
    scores, completions = pricer.answer_prices(model, tokenizer, items)
    assert model.training  # the caller's mode is restored
    assert len(completions) == 3
    assert scores == score_answers(completions, [item.price for item in items])
    again, _ = pricer.answer_prices(model, tokenizer, items)
    assert again == scores  # greedy: the same answers every time
    with pytest.raises(ValueError, match="No items"):
        pricer.answer_prices(model, tokenizer, [])


def scores_of(share: float, error: float) -> pricer.PricerScores:
    return pricer.PricerScores(n_items=10, n_right_format=round(10 * share), format_share=share,
                               mean_absolute_error=error, mean_absolute_error_parsed=error, mean_true_price=100.0)


def test_adapter_claims_are_stated_per_profile():
    tiny = pricer.adapter_claims("tiny", scores_of(0.0, 150.0), scores_of(1.0, 40.0))
    assert list(tiny.values()) == [True, True] and "mean absolute error is below" in list(tiny)[1]
    assert pricer.adapter_claims("tiny", scores_of(0.5, 50.0), scores_of(0.4, 60.0)) == dict.fromkeys(tiny, False)
    # a Hub adapter priced real listings: only the answer format is claimed on the course's synthetic items
    hub = pricer.adapter_claims("llama-3.2-3b", scores_of(0.9, 20.0), scores_of(0.6, 80.0))
    assert hub == {"the adapted model answers with a price on at least half the items": True}
    assert not any(pricer.adapter_claims("llama-3.1-8b", scores_of(0.9, 20.0), scores_of(0.4, 10.0)).values())
    with pytest.raises(ValueError, match="No adapter claims for profile 'gpt-2'"):
        pricer.adapter_claims("gpt-2", scores_of(0, 0), scores_of(0, 0))


def _item(category: str, price: int) -> pricer.PricerItem:
    return pricer.PricerItem(prompt=f"p{category}{price}", answer=str(price), price=price,
                             attributes={"category": category, "material": "plastic", "size": "medium",
                                         "brand_tier": "standard", "color": "red"})


def test_yardsticks_guess_the_training_median_and_the_category_median():
    train = [_item("mug", 10), _item("mug", 20), _item("tent", 100), _item("tent", 200), _item("tent", 400)]
    items = [_item("mug", 16), _item("tent", 190)]
    scores = pricer.yardstick_scores(train, items)
    # training median 100: errors 84 and 90; category medians 15 (10 and 20) and 200: errors 1 and 10
    assert scores["training median"].mean_absolute_error == 87.0
    assert scores["category median"].mean_absolute_error == 5.5
    assert scores["category median"].format_share == 1.0


def test_yardsticks_of_the_shipped_splits_are_those_data_readme_quotes():
    scores = pricer.yardstick_scores(pricer.load_split("train"), pricer.load_split("test"))
    assert scores["training median"].mean_absolute_error == 109.28
    assert scores["category median"].mean_absolute_error == 71.085


def test_yardsticks_refuse_a_category_without_training_items():
    with pytest.raises(ValueError, match="categories \\['tent'\\]"):
        pricer.yardstick_scores([_item("mug", 10)], [_item("tent", 100)])
    with pytest.raises(ValueError, match="needs training items"):
        pricer.yardstick_scores([], [_item("tent", 100)])


def test_yardstick_claims_are_stated_per_profile():
    yardsticks = {"training median": scores_of(1.0, 100.0), "category median": scores_of(1.0, 45.0)}
    assert pricer.yardstick_claims("tiny", scores_of(1.0, 40.0), yardsticks) == {
        "the adapted model's mean absolute error beats guessing the category's median price": True}
    assert not any(pricer.yardstick_claims("tiny", scores_of(1.0, 50.0), yardsticks).values())
    assert pricer.yardstick_claims("llama-3.2-3b", scores_of(1.0, 90.0), yardsticks) == {
        pricer.BEATS_CATEGORY_MEDIAN: claims.NotChecked(pricer.HUB_ADAPTERS_NOT_MEASURED)}
    with pytest.raises(ValueError, match="same items"):
        other = pricer.PricerScores(n_items=3, n_right_format=3, format_share=1.0, mean_absolute_error=1.0,
                                    mean_absolute_error_parsed=1.0, mean_true_price=1.0)
        pricer.yardstick_claims("tiny", other, yardsticks)
    with pytest.raises(ValueError, match="'category median'"):
        pricer.yardstick_claims("tiny", scores_of(1.0, 40.0), {})
    with pytest.raises(ValueError, match="No yardstick claims for profile 'gpt-2'"):
        pricer.yardstick_claims("gpt-2", scores_of(1.0, 40.0), yardsticks)


def test_notebook_04s_yardstick_cell_runs_on_every_profile_and_says_what_it_did_not_check(capsys):
    yardsticks = {"training median": scores_of(1.0, 100.0), "category median": scores_of(1.0, 45.0)}
    claims.check_all(pricer.yardstick_claims("tiny", scores_of(1.0, 40.0), yardsticks))  # as 04's section 11 calls it
    assert capsys.readouterr().out == (  # the tiny profile's committed output, byte for byte
        "✓ the adapted model's mean absolute error beats guessing the category's median price: True\n")
    for hub_profile in ("llama-3.2-3b", "llama-3.1-8b"):
        claims.check_all(pricer.yardstick_claims(hub_profile, scores_of(1.0, 90.0), yardsticks))  # no error
        assert capsys.readouterr().out == (
            "- not checked: the adapted model's mean absolute error beats guessing the category's median price "
            "(the Hub adapters were trained on real listings, not on these synthetic items)\n")


def test_catalogue_pages_hold_every_listing_but_the_excluded_and_never_a_price():
    test_prompts = [item.prompt for item in pricer.load_split("test")]
    pages = pricer.catalogue_pages(test_prompts, seed=2024)
    listings = [listing for page in pages for listing in page.split("\n\n")]
    assert len(listings) == len(set(listings)) == 6912 - 200  # 3 phrasings x 8 colours x 288 products, less the tests
    assert not {pricer.make_prompt(listing) for listing in listings} & set(test_prompts)
    assert not any("$" in page or pricer.QUESTION in page for page in pages)
    assert pages == pricer.catalogue_pages(test_prompts, seed=2024)  # the seed fixes the order
    with pytest.raises(ValueError, match="per_page must be at least 1"):
        pricer.catalogue_pages([], seed=0, per_page=0)


def test_commonest_answer_counts_parsed_prices():
    assert pricer.commonest_answer(["28", "28", "24", "x", "28.00", "$24"]) == (28, 3, 2)
    assert pricer.commonest_answer(["24", "28"]) == (24, 1, 2)  # the first of equals
    assert pricer.commonest_answer(["the LORD", ""]) == (None, 0, 0)
    with pytest.raises(ValueError, match="No completions"):
        pricer.commonest_answer([])


def test_short_run_verdict_says_what_the_run_learned():
    constant = pricer.short_run_verdict(["28"] * 15 + ["24"], scores_of(1.0, 91.19), scores_of(1.0, 59.44))
    assert constant == ("2 different prices in 16 answers, 28 in 15 of them: it learned the answer's format and "
                        "close to one constant price, not to read the items; mean absolute error $91.19 against "
                        "$59.44 for guessing the category median, worse than that trivial baseline")
    varied = pricer.short_run_verdict(["10", "20", "30"], scores_of(1.0, 40.0), scores_of(1.0, 45.0))
    assert varied.startswith("3 different prices in 3 answers: it reads something of each item")
    assert varied.endswith("better than that trivial baseline")
    assert pricer.short_run_verdict(["x"], scores_of(0.0, 90.0), scores_of(1.0, 45.0)).startswith("no answer")


def test_short_run_claims_are_stated_per_profile():
    yardsticks = {"training median": scores_of(1.0, 100.0), "category median": scores_of(1.0, 45.0)}
    tiny = pricer.short_run_claims("tiny", ["28"] * 9 + ["5"], scores_of(1.0, 90.0), yardsticks)
    assert list(tiny.values()) == [True, True]
    assert not any(pricer.short_run_claims("tiny", ["1", "2", "3"], scores_of(1.0, 40.0), yardsticks).values())
    hub = pricer.short_run_claims("llama-3.1-8b", ["28"], scores_of(1.0, 90.0), yardsticks)
    assert set(hub.values()) == {claims.NotChecked(pricer.SHORT_RUN_NOT_MEASURED)} and hub.keys() == tiny.keys()
    with pytest.raises(ValueError, match="'category median'"):
        pricer.short_run_claims("tiny", ["28"], scores_of(1.0, 90.0), {})
    with pytest.raises(ValueError, match="No short-run claims for profile 'gpt-2'"):
        pricer.short_run_claims("gpt-2", ["28"], scores_of(1.0, 90.0), yardsticks)
