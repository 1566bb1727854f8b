"""Write the pricer task's train and test splits to ``data/pricer/``.

Run from the repository root: ``python data/build/make_pricer_data.py``. The price rule, the
phrasings, the seed and the split sizes all live in ``helpers/pricer.py``, so the files can be
rebuilt byte for byte and the notebooks read the same rule the data was made with.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `helpers`

from helpers import pricer  # noqa: E402


def main() -> None:
    train, test = pricer.make_splits(pricer.SPLIT_SEED, pricer.N_TRAIN, pricer.N_TEST)
    for name, items in (("train", train), ("test", test)):
        path = pricer.SPLIT_DIR / f"{name}.jsonl"
        pricer.write_jsonl(items, path)
        prices = [item.price for item in items]
        print(f"{path.relative_to(pricer.SPLIT_DIR.parents[1])}: {len(items):,} items, "
              f"prices ${min(prices)} to ${max(prices)}, mean ${sum(prices) / len(prices):.2f}")
    combination = lambda item: tuple(item.attributes[k] for k in ("category", "material", "size", "brand_tier"))  # noqa: E731
    seen = Counter(combination(item) for item in train)
    unseen = sum(combination(item) not in seen for item in test)
    print(f"test items whose attribute combination never occurs in train: {unseen} of {len(test)}")


if __name__ == "__main__":
    main()
