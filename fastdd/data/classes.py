"""Named class lists (ImageNet wnids) of the distillation benchmarks (SPEC "Class lists")."""
from __future__ import annotations

from pathlib import Path

IMAGEWOOF = "n02096294 n02093754 n02111889 n02088364 n02086240 n02089973 n02087394 n02115641 n02099601 n02105641".split()
IMAGENETTE = "n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 n03445777 n03888257".split()
NAMED_CLASS_LISTS = {"imagenette": IMAGENETTE, "imagewoof": IMAGEWOOF}


def resolve_class_list(spec: str) -> list[str]:
    """'imagenette' | 'imagewoof' | a text file with one class name per line."""
    if spec in NAMED_CLASS_LISTS:
        return list(NAMED_CLASS_LISTS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--classes must be one of {sorted(NAMED_CLASS_LISTS)} or a file, got {spec!r}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class list file {path} is empty")
    return names
