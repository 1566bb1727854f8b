"""The pricer task: synthetic product descriptions whose price the tiny model learns to state.

The course's fine-tuned adapter answers "How much does this cost to the nearest dollar?" for real
product listings. Offline we need a task of the same shape that a 7-million-parameter model can learn
in minutes on a CPU, so the products here are synthetic and their price is an exact, documented
function of their attributes:

    price = round_half_up(base price of the category
                          x material multiplier x size multiplier x brand-tier multiplier)

The multipliers are stored as whole percentages so the rule is evaluated in exact integer arithmetic
(no float rounding surprises). The colour and the wording of the description do not change the price:
they are there so the model has to pick the attributes out of varied text.

Everything the adapter's training script and the notebooks share lives here: the price rule, the
prompt template, the generator of the train and test splits, the encoding used for training (loss
on the answer tokens only), greedy answering, answer parsing and scoring.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from helpers.claims import NotChecked

# ---------------------------------------------------------------------------------------------
# The price rule
# ---------------------------------------------------------------------------------------------

#: Base price in whole dollars of a medium, plastic, standard-brand item of each category.
CATEGORY_BASE_PRICE: dict[str, int] = {
    "mug": 12,
    "t-shirt": 20,
    "lamp": 40,
    "backpack": 50,
    "headphones": 80,
    "chair": 120,
    "watch": 150,
    "tent": 200,
}
#: Material multipliers, in percent.
MATERIAL_PERCENT: dict[str, int] = {"plastic": 100, "bamboo": 125, "steel": 150, "leather": 200}
#: Size multipliers, in percent.
SIZE_PERCENT: dict[str, int] = {"small": 75, "medium": 100, "large": 150}
#: Brand-tier multipliers, in percent.
BRAND_TIER_PERCENT: dict[str, int] = {"budget": 50, "standard": 100, "premium": 200}
#: Colours appear in the description but never change the price.
COLORS: tuple[str, ...] = ("black", "white", "red", "blue", "green", "grey", "brown", "yellow")

_ATTRIBUTE_CHOICES: dict[str, Sequence[str]] = {
    "category": tuple(CATEGORY_BASE_PRICE),
    "material": tuple(MATERIAL_PERCENT),
    "size": tuple(SIZE_PERCENT),
    "brand_tier": tuple(BRAND_TIER_PERCENT),
    "color": COLORS,
}


def _check_choice(kind: str, value: str) -> None:
    allowed = _ATTRIBUTE_CHOICES[kind]
    if value not in allowed:
        raise ValueError(f"Unknown {kind} {value!r}: choose one of {', '.join(allowed)}.")


def price_of(category: str, material: str, size: str, brand_tier: str) -> int:
    """Return the true price in whole dollars of a product with these attributes.

    The product of the base price and the three percentages is an exact integer in units of
    1/1,000,000 dollar; adding half a dollar and dividing rounds halves up (Python's ``round``
    would round halves to even, which is harder to state in a README).
    """
    for kind, value in (("category", category), ("material", material), ("size", size), ("brand_tier", brand_tier)):
        _check_choice(kind, value)
    micro_dollars = (
        CATEGORY_BASE_PRICE[category] * MATERIAL_PERCENT[material] * SIZE_PERCENT[size] * BRAND_TIER_PERCENT[brand_tier]
    )
    one_dollar = 100 * 100 * 100  # three percentages
    return (micro_dollars + one_dollar // 2) // one_dollar


# ---------------------------------------------------------------------------------------------
# Descriptions, prompts and items
# ---------------------------------------------------------------------------------------------

QUESTION = "How much does this cost to the nearest dollar?"
ANSWER_PREFIX = "Price is $"
PROMPT_TEMPLATE = QUESTION + "\n\n{description}\n\n" + ANSWER_PREFIX

# Several phrasings of the same facts, so the model learns the attributes rather than one layout.
_DESCRIPTION_TEMPLATES: tuple[str, ...] = (
    "{Color} {material} {category}\nSize: {size}. Brand: {brand_tier}.",
    "{Brand_tier} {category} made of {material}\nA {size} {category} in {color}.",
    "{Size} {color} {category}\nMaterial: {material}. A {brand_tier} brand.",
)


@dataclass(frozen=True)
class Product:
    """The attributes of one synthetic product; ``price`` follows from them by :func:`price_of`."""

    category: str
    material: str
    size: str
    brand_tier: str
    color: str

    def __post_init__(self) -> None:
        for kind, value in asdict(self).items():
            _check_choice(kind, value)

    @property
    def price(self) -> int:
        return price_of(self.category, self.material, self.size, self.brand_tier)


def describe(product: Product, template_index: int) -> str:
    """Write the two-line description of ``product`` with one of the fixed phrasings."""
    if not 0 <= template_index < len(_DESCRIPTION_TEMPLATES):
        raise ValueError(f"template_index must be in 0..{len(_DESCRIPTION_TEMPLATES) - 1}, got {template_index}.")
    fields = asdict(product)
    fields.update({key.capitalize(): value.capitalize() for key, value in asdict(product).items()})
    return _DESCRIPTION_TEMPLATES[template_index].format(**fields)


def make_prompt(description: str) -> str:
    """Wrap a description in the pricer question; the prompt ends with ``"Price is $"``."""
    if not description.strip():
        raise ValueError("The description is empty: pass the product's text.")
    return PROMPT_TEMPLATE.format(description=description)


@dataclass(frozen=True)
class PricerItem:
    """One line of a split: the prompt, the answer the model should write after it, the price, the attributes."""

    prompt: str
    answer: str
    price: int
    attributes: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> PricerItem:
        record = json.loads(line)
        missing = {"prompt", "answer", "price", "attributes"} - set(record)
        if missing:
            raise ValueError(f"A pricer line lacks the field(s) {sorted(missing)}: was it written by write_jsonl?")
        return cls(**record)


def random_item(rng: random.Random) -> PricerItem:
    """Draw one product uniformly over every attribute and phrasing, and return its item."""
    product = Product(**{kind: rng.choice(choices) for kind, choices in _ATTRIBUTE_CHOICES.items()})
    description = describe(product, rng.randrange(len(_DESCRIPTION_TEMPLATES)))
    return PricerItem(make_prompt(description), str(product.price), product.price, asdict(product))


def make_splits(seed: int, n_train: int, n_test: int) -> tuple[list[PricerItem], list[PricerItem]]:
    """Return ``(train, test)`` drawn from one seeded generator; no test prompt appears in train.

    The test split is drawn first with distinct prompts; train items whose prompt is a test prompt are
    redrawn, so the held-out score never rewards recalling a seen text verbatim. Attribute combinations
    (there are only a few hundred) do repeat: the task is to read the attributes and apply the rule.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be at least 1, got {n_train} and {n_test}.")
    distinct_prompts = len(_DESCRIPTION_TEMPLATES) * len(COLORS) * len(CATEGORY_BASE_PRICE) * len(MATERIAL_PERCENT) * len(SIZE_PERCENT) * len(BRAND_TIER_PERCENT)
    if n_test > distinct_prompts // 2:
        raise ValueError(f"n_test={n_test} is too large: only {distinct_prompts} distinct prompts exist; use at most half.")
    rng = random.Random(seed)
    test: dict[str, PricerItem] = {}
    while len(test) < n_test:
        item = random_item(rng)
        test.setdefault(item.prompt, item)
    train: list[PricerItem] = []
    while len(train) < n_train:
        item = random_item(rng)
        if item.prompt not in test:
            train.append(item)
    return train, list(test.values())


def catalogue_pages(exclude_prompts: Iterable[str], seed: int, per_page: int = 16) -> list[str]:
    """Pages of product listings WITHOUT prices, for the tiny base model's pretraining mix.

    A real Llama has read countless product listings before anyone fine-tunes it to price them, so its
    adapter only has to learn the task, not the domain. This gives the tiny base the same head start: every
    distinct description (all products in all phrasings) except those of ``exclude_prompts`` (the test
    split's, so no test text is ever seen), shuffled by ``seed`` and grouped ``per_page`` to a page. Prices,
    the question and the ``"Price is $"`` answer never appear: those are what the adapter must learn.
    """
    if per_page < 1:
        raise ValueError(f"per_page must be at least 1, got {per_page}.")
    excluded = set(exclude_prompts)
    descriptions = []
    for category in CATEGORY_BASE_PRICE:
        for material in MATERIAL_PERCENT:
            for size in SIZE_PERCENT:
                for brand_tier in BRAND_TIER_PERCENT:
                    for color in COLORS:
                        product = Product(category, material, size, brand_tier, color)
                        for template_index in range(len(_DESCRIPTION_TEMPLATES)):
                            description = describe(product, template_index)
                            if make_prompt(description) not in excluded:
                                descriptions.append(description)
    random.Random(seed).shuffle(descriptions)
    return ["\n\n".join(descriptions[i : i + per_page]) for i in range(0, len(descriptions), per_page)]


#: Where the shipped splits live, found from this file so notebooks and scripts agree from any directory.
SPLIT_DIR = Path(__file__).resolve().parents[1] / "data" / "pricer"
#: The settings that produced the shipped splits (``data/build/make_pricer_data.py`` uses them).
SPLIT_SEED = 20240913
N_TRAIN = 2000
N_TEST = 200


#: Where the shipped adapter lives (``data/build/train_pricer_adapter.py`` writes it).
ADAPTER_DIR = SPLIT_DIR.parent / "pricer-adapter"
#: The LoRA settings of the shipped adapter: those of the course's pricer adapter (r=32, alpha=64,
#: the four attention projections). ``peft.LoraConfig(**ADAPTER_LORA_SETTINGS)`` rebuilds the config.
ADAPTER_LORA_SETTINGS: dict = dict(
    r=32,
    lora_alpha=64,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    bias="none",
    task_type="CAUSAL_LM",
)


def write_jsonl(items: Iterable[PricerItem], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8, ``\\n`` line ends)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for item in items:
            file.write(item.to_json() + "\n")


def read_jsonl(path: str | Path) -> list[PricerItem]:
    """Read a split written by :func:`write_jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: rebuild it with `python data/build/make_pricer_data.py`.")
    with path.open(encoding="utf-8") as file:
        return [PricerItem.from_json(line) for line in file if line.strip()]


def load_split(name: str, split_dir: str | Path = SPLIT_DIR) -> list[PricerItem]:
    """Read the shipped ``"train"`` or ``"test"`` split."""
    if name not in ("train", "test"):
        raise ValueError(f"Unknown split {name!r}: use 'train' or 'test'.")
    return read_jsonl(Path(split_dir) / f"{name}.jsonl")


# ---------------------------------------------------------------------------------------------
# Training encoding: loss on the answer tokens only
# ---------------------------------------------------------------------------------------------

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and transformers) skips


def encode_for_training(tokenizer, item: PricerItem) -> tuple[list[int], list[int]]:
    """Return ``(input_ids, labels)`` for one item: the prompt's labels are ``IGNORE_INDEX``.

    Prompt and answer are tokenized separately and concatenated. The byte-level pre-tokenizer
    always splits ``$`` from the digits after it, so this equals tokenizing the whole text, and the
    boundary between "question" and "answer" is exact. The answer ends with the end-of-text token,
    which teaches the model to stop after the number.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token: the answer could not be terminated.")
    prompt_ids = tokenizer(item.prompt)["input_ids"]
    answer_ids = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def collate_for_training(encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of ``encode_for_training`` outputs into ``input_ids``, ``attention_mask``, ``labels``."""
    if not encoded:
        raise ValueError("The batch is empty.")
    longest = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Answering, parsing and scoring
# ---------------------------------------------------------------------------------------------

# The right format: digits right after "$" (a "$" of the answer's own is allowed, and cents as the course's Hub
# adapters write them, "137.00"), then the end of the answer or whitespace.
_ANSWER_PATTERN = re.compile(r"\$?(\d+)(?:\.(\d{1,2}))?(?:\s|$)")


def parse_price(text: str) -> int | None:
    """Return the whole-dollar price a completion states, or ``None`` if it is not in the right format.

    ``text`` is either the completion that follows the prompt or a whole text containing ``"Price is $"``
    (then what follows its last occurrence is read). The right format is one or more digits right after
    the ``$``, optionally with one or two decimals of cents, followed by the end of the text or whitespace
    (anything after that is ignored). The course's tiny adapter answers in whole dollars ("137"); the course's
    Hub adapters were trained to write "Price is $137.00", and a model may repeat the dollar sign ("$137").
    Cents are rounded to the nearest dollar, halves up. So "137", "137\\nMore", "137.00" and "$137" parse to
    137, "12.5" to 13, while "", " 137", "1,370", "12.505", "137th" and "the LORD" are ``None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_price expects a str, got {type(text).__name__}.")
    if ANSWER_PREFIX in text:
        text = text.rsplit(ANSWER_PREFIX, 1)[1]
    match = _ANSWER_PATTERN.match(text)
    if not match:
        return None
    dollars, cents = int(match.group(1)), int((match.group(2) or "0").ljust(2, "0"))
    return dollars + (cents >= 50)


@dataclass(frozen=True)
class PricerScores:
    """How well a list of completions prices its items.

    ``mean_absolute_error`` scores every item: an answer that cannot be parsed counts as a guess of
    $0, so its error is the true price. (Dropping unparsable answers would let a model that rarely
    answers look accurate.) ``mean_absolute_error_parsed`` is the error over the parsable answers
    only, or ``None`` when there are none.
    """

    n_items: int
    n_right_format: int
    format_share: float
    mean_absolute_error: float
    mean_absolute_error_parsed: float | None
    mean_true_price: float


def score_answers(completions: Sequence[str], true_prices: Sequence[int]) -> PricerScores:
    """Score completions against the true prices (see :class:`PricerScores` for the rule)."""
    if len(completions) != len(true_prices):
        raise ValueError(f"{len(completions)} completions but {len(true_prices)} prices: pass one of each per item.")
    if not completions:
        raise ValueError("Nothing to score: the lists are empty.")
    parsed = [parse_price(text) for text in completions]
    right_format = torch.tensor([value is not None for value in parsed])
    predicted = torch.tensor([value if value is not None else 0 for value in parsed], dtype=torch.float64)
    truth = torch.tensor(list(true_prices), dtype=torch.float64)
    errors = (predicted - truth).abs()
    n_right = int(right_format.sum())
    return PricerScores(
        n_items=len(completions),
        n_right_format=n_right,
        format_share=n_right / len(completions),
        mean_absolute_error=float(errors.mean()),
        mean_absolute_error_parsed=float(errors[right_format].mean()) if n_right else None,
        mean_true_price=float(truth.mean()),
    )


def _median(values: Sequence[int]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def yardstick_scores(train_items: Sequence[PricerItem], items: Sequence[PricerItem]) -> dict[str, PricerScores]:
    """Two model-free guesses to judge a mean absolute error by, scored on ``items``:

    - ``"training median"``: the median price of ``train_items``, guessed for every item;
    - ``"category median"``: the median training price of the item's category (the first thing a pricer should
      read). A model that does not beat it reads no more than the category.

    Medians of an even count are the mean of the middle two, written with cents (``"71.50"``), as the scorer
    rounds them, halves up.
    """
    if not train_items or not items:
        raise ValueError("yardstick_scores needs training items to take medians from and items to score.")
    overall = _median([item.price for item in train_items])
    by_category: dict[str, list[int]] = {}
    for item in train_items:
        by_category.setdefault(item.attributes["category"], []).append(item.price)
    missing = {item.attributes["category"] for item in items} - set(by_category)
    if missing:
        raise ValueError(f"No training items of the categories {sorted(missing)}: cannot take their median.")
    true_prices = [item.price for item in items]
    guesses = {
        "training median": [f"{overall:.2f}"] * len(items),
        "category median": [f"{_median(by_category[item.attributes['category']]):.2f}" for item in items],
    }
    return {name: score_answers(answers, true_prices) for name, answers in guesses.items()}


#: Enough new tokens for a four-digit price, the end-of-text token and a little room to misbehave.
ANSWER_MAX_NEW_TOKENS = 8


def answer_prices(model, tokenizer, items: Sequence[PricerItem]) -> tuple[PricerScores, list[str]]:
    """Greedy-decode an answer to every item's prompt and score it; return ``(scores, completions)``.

    Decoding is :func:`helpers.quality.greedy_generate` (prompts of equal length together, without padding)
    with room for a four-digit price, the end-of-text token and a little more.
    """
    from helpers.quality import greedy_generate

    if not items:
        raise ValueError("No items to answer.")
    was_training = model.training
    model.eval()  # dropout off: answers must repeat exactly
    try:
        completions = greedy_generate(model, tokenizer, [item.prompt for item in items], ANSWER_MAX_NEW_TOKENS)
    finally:
        model.train(was_training)
    return score_answers(completions, [item.price for item in items]), completions


BEATS_CATEGORY_MEDIAN = "the adapted model's mean absolute error beats guessing the category's median price"
"""The yardstick claim of notebooks 04 and 06 (:func:`yardstick_claims`)."""

HUB_ADAPTERS_NOT_MEASURED = "the Hub adapters were trained on real listings, not on these synthetic items"
"""Why the Hub profiles' adapters are not held to the course's yardsticks."""


def yardstick_claims(profile_name: str, adapted: PricerScores,
                     yardsticks: dict[str, PricerScores]) -> dict[str, bool | NotChecked]:
    """What notebooks 04 and 06 claim about an adapter against :func:`yardstick_scores` on the same items (pure).

    The tiny profile's shipped adapter must beat guessing the category's median price: it reads the attributes,
    not only the category. The Hub adapters priced real listings, not these synthetic items: the same claim comes
    back as ``NotChecked``, which ``helpers.claims.check_all`` prints as not checked, with the reason.
    """
    if "category median" not in yardsticks:
        raise ValueError("Pass the dict yardstick_scores returns (it holds a 'category median' entry).")
    if yardsticks["category median"].n_items != adapted.n_items:
        raise ValueError("Score the yardsticks on the same items as the adapted model.")
    if profile_name == "tiny":
        return {BEATS_CATEGORY_MEDIAN: adapted.mean_absolute_error < yardsticks["category median"].mean_absolute_error}
    if profile_name in ("llama-3.2-3b", "llama-3.1-8b"):
        return {BEATS_CATEGORY_MEDIAN: NotChecked(HUB_ADAPTERS_NOT_MEASURED)}
    raise ValueError(f"No yardstick claims for profile {profile_name!r}: add them to helpers.pricer.yardstick_claims.")


def adapter_claims(profile_name: str, base: PricerScores, adapted: PricerScores) -> dict[str, bool]:
    """What notebooks 04 and 06 claim about an adapter on the pricer items, per profile (pure).

    The tiny profile's adapter was trained by this course on these very items, so it must beat the base on
    format and on error. The Hub profiles' adapters were trained on real product listings, in the format
    "Price is $137.00", not on the course's synthetic items; what must hold there is only that the adapted model
    answers with a price most of the time, whatever its accuracy on items it never saw the like of.
    """
    if profile_name == "tiny":
        return {
            "the adapted model answers in the right format at least as often as the base":
                adapted.format_share >= base.format_share,
            "the adapted model's mean absolute error is below the base's":
                adapted.mean_absolute_error < base.mean_absolute_error,
        }
    if profile_name in ("llama-3.2-3b", "llama-3.1-8b"):
        return {"the adapted model answers with a price on at least half the items": adapted.format_share >= 0.5}
    raise ValueError(f"No adapter claims for profile {profile_name!r}: add them to helpers.pricer.adapter_claims.")


def commonest_answer(completions: Sequence[str]) -> tuple[int | None, int, int]:
    """``(price, times, distinct)``: the price the completions state most often (the first of equals, None when
    none parses), how many completions state it, and how many different prices they state."""
    if not completions:
        raise ValueError("No completions: answer some items first.")
    parsed = [value for value in (parse_price(text) for text in completions) if value is not None]
    if not parsed:
        return None, 0, 0
    counts = {value: parsed.count(value) for value in dict.fromkeys(parsed)}
    price = max(counts, key=counts.get)
    return price, counts[price], len(counts)


def short_run_verdict(completions: Sequence[str], adapted: PricerScores, category_median: PricerScores) -> str:
    """What a training run learned, in one plain sentence computed from its answers (notebook 06): how many
    different prices it gives, and whether it beats guessing the category's median price."""
    price, times, distinct = commonest_answer(completions)
    if price is None:
        learned = "no answer in the right format: it has not even learned the format yet"
    elif 2 * times >= len(completions):
        prices = "one price" if distinct == 1 else f"{distinct} different prices"
        learned = (f"{prices} in {len(completions)} answers, {price} in {times} of them: it learned the answer's "
                   "format and close to one constant price, not to read the items")
    else:
        learned = f"{distinct} different prices in {len(completions)} answers: it reads something of each item"
    mae, baseline = adapted.mean_absolute_error, category_median.mean_absolute_error
    compared = ("worse than that trivial baseline" if mae > baseline else "better than that trivial baseline")
    return (f"{learned}; mean absolute error ${mae:.2f} against ${baseline:.2f} for guessing the category median, "
            f"{compared}")


SHORT_RUN_NOT_MEASURED = "the course measured the short run on the tiny profile only"
"""Why the Hub profiles' short runs are not held to the tiny profile's claims."""


def short_run_claims(profile_name: str, completions: Sequence[str], adapted: PricerScores,
                     yardsticks: dict[str, PricerScores]) -> dict[str, bool | NotChecked]:
    """What notebook 06 claims about its short run (a few dozen steps) on the pricer items, per profile (pure).

    On the tiny profile the run learns the format and a near-constant price before it learns to read the items:
    one price for at least half of them, and an error above guessing the category median. The Hub profiles train
    another model for another number of steps: the same claims come back as ``NotChecked``.
    """
    if "category median" not in yardsticks:
        raise ValueError("Pass the dict yardstick_scores returns (it holds a 'category median' entry).")
    claims = ["the short run answers one price for at least half of the items",
              "the short run prices worse than guessing the category median"]
    if profile_name == "tiny":
        _, times, _ = commonest_answer(completions)
        return dict(zip(claims, (2 * times >= len(completions),
                                 adapted.mean_absolute_error > yardsticks["category median"].mean_absolute_error)))
    if profile_name in ("llama-3.2-3b", "llama-3.1-8b"):
        return {claim: NotChecked(SHORT_RUN_NOT_MEASURED) for claim in claims}
    raise ValueError(f"No short-run claims for profile {profile_name!r}: add them to helpers.pricer.short_run_claims.")
