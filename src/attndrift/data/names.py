"""Class names and prompt templates of the real datasets, and the rules for turning raw label
names into words a text tower can match.

Numeric class names are refused: the study's Flowers102 zero-shot scored ~0.2% because its
prompts read "a photo of a 17".
"""

from __future__ import annotations

import re

# EuroSAT labels (tanganke/eurosat, alphabetical) -> CLIP's descriptive names.
EUROSAT = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river",
    "SeaLake": "lake or sea",
}

# Oxford 102 Flowers in the dataset's official label order (label 0 = image class 1).
FLOWERS102 = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster",
    "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip",
    "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove",
    "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)

TEMPLATES = {
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "pets": ("a photo of a {}, a type of pet.",),
    "cifar100": ("a photo of a {}.",),  # the study's prompt
    "cifar10": ("a photo of a {}.",),  # the same prompt, for the study code's later protocol
    "flowers102": ("a photo of a {}, a type of flower.",),
    "generic": ("a photo of a {}.",),
}


class ClassNameError(ValueError):
    """Class names that a text tower cannot use."""


def humanize(raw: str) -> str:
    """``american_bulldog`` -> ``american bulldog``; ``SeaLake`` -> ``sea lake``."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", raw.strip())
    return re.sub(r"[_\s]+", " ", text).strip().lower()


def prompt_names(raw: list[str], *, rename: dict[str, str] | None = None,
                 canonical: tuple[str, ...] | None = None, source: str = "dataset") -> list[str]:
    """Class names for prompts, in label order.

    ``canonical`` (names by label index) wins when the raw names are numeric; ``rename`` maps raw
    names to descriptive ones; anything else is humanised. Numeric names left over are an error.
    """
    if canonical is not None and all(r.strip().isdigit() for r in raw):
        # Numeric names are official class numbers; their order in the dataset may be
        # lexicographic ("1", "10", "100", ...), so map by value, 1-based unless a 0 appears.
        numbers = [int(r) for r in raw]
        offset = 0 if min(numbers) == 0 else 1
        if len(canonical) != len(raw) or sorted(n - offset for n in numbers) != list(
                range(len(canonical))):
            raise ClassNameError(f"{source}: numeric labels {min(numbers)}..{max(numbers)} do "
                                 f"not match the {len(canonical)} known class names")
        return [canonical[n - offset] for n in numbers]
    names = [(rename or {}).get(r, humanize(r)) for r in raw]
    numeric = [n for n in names if re.fullmatch(r"[\d\s.]+", n)]
    if numeric:
        raise ClassNameError(
            f"{source} has numeric class names ({numeric[0]!r}, ...): zero-shot prompts would "
            f"read 'a photo of a {numeric[0]}'; give the class names in words")
    if len(set(names)) != len(names):
        raise ClassNameError(f"{source}: duplicate class names after humanising: {names}")
    return names
