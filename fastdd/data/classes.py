"""Named class lists (ImageNet wnids) of the distillation benchmarks (SPEC "Class lists")."""
from __future__ import annotations

from pathlib import Path

IMAGEWOOF = "n02096294 n02093754 n02111889 n02088364 n02086240 n02089973 n02087394 n02115641 n02099601 n02105641".split()
IMAGENETTE = "n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 n03445777 n03888257".split()
NAMED_CLASS_LISTS = {"imagenette": IMAGENETTE, "imagewoof": IMAGEWOOF}

# ImageNet-1K label index (the DiT class id) of the wnids above
IMAGENET_INDEX = {
    "n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
    "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701,
    "n02096294": 193, "n02093754": 182, "n02111889": 258, "n02088364": 162, "n02086240": 155,
    "n02089973": 167, "n02087394": 159, "n02115641": 273, "n02099601": 207, "n02105641": 229,
}  # fmt: skip


def resolve_class_list(spec: str) -> list[str]:
    """'imagenette' | 'imagewoof' | a text file with one class per line ("name" or "name label")."""
    return [name for name, _ in resolve_class_entries(spec)]


def resolve_class_entries(spec: str) -> list[tuple[str, int | None]]:
    """[(class name, model label or None)]: named lists carry their ImageNet labels; a file line is "name" or
    "name label" (label = the generator's class index, e.g. an ImageNet id for DiT-XL/2)."""
    if spec in NAMED_CLASS_LISTS:
        return [(name, IMAGENET_INDEX[name]) for name in NAMED_CLASS_LISTS[spec]]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--classes must be one of {sorted(NAMED_CLASS_LISTS)} or a file, got {spec!r}")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
            raise ValueError(f"class list file {path} line {number}: expected 'name' or 'name label', got {line.strip()!r}")
        entries.append((fields[0], int(fields[1]) if len(fields) == 2 else None))
    if not entries:
        raise ValueError(f"class list file {path} is empty")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"class list file {path} names a class twice")
    return entries
