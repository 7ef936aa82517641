"""Named class lists (ImageNet wnids) of the distillation benchmarks: ImageNette and ImageWoof (their 10 wnids each)
and ImageNet-1K (all 1,000, sorted; a wnid's index is its ImageNet / DiT label)."""

from __future__ import annotations

from pathlib import Path

IMAGEWOOF = (
    "n02096294 n02093754 n02111889 n02088364 n02086240 n02089973 n02087394 n02115641 n02099601 n02105641".split()
)
IMAGENETTE = (
    "n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 n03445777 n03888257".split()
)
NAMED_CLASS_LISTS = {"imagenette": IMAGENETTE, "imagewoof": IMAGEWOOF}

# ImageNet-1K's 1,000 wnids in the standard sorted order: the DiT class id (label) of a wnid is its index
IMAGENET1K = (Path(__file__).parent / "imagenet1k_wnids.txt").read_text().split()
IMAGENET_INDEX = {wnid: index for index, wnid in enumerate(IMAGENET1K)}
NAMED_CLASS_LISTS["imagenet1k"] = IMAGENET1K


def resolve_class_list(spec: str) -> list[str]:
    """'imagenette' | 'imagewoof' | 'imagenet1k' | a text file with one class per line ("name" or "name label")."""
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
            raise ValueError(
                f"class list file {path} line {number}: expected 'name' or 'name label', got {line.strip()!r}"
            )
        entries.append((fields[0], int(fields[1]) if len(fields) == 2 else None))
    if not entries:
        raise ValueError(f"class list file {path} is empty")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"class list file {path} names a class twice")
    return entries


def check_class_name(name: str) -> str:
    """A class name becomes a folder of the run: it must be one safe path component (ValueError otherwise)."""
    unsafe = (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or any(ord(c) < 32 for c in name)
    )
    if unsafe:
        raise ValueError(
            f"--classes: class name {name!r} is not a safe folder name (one path component, no leading "
            "'.', no '/', '\\' or control characters)"
        )
    return name


def resolve_classes(
    classes: str | None, data: str | None, num_model_classes: int, prior_extra: dict
) -> tuple[list[str], list[int], str]:
    """(class names, model label per class, dataset kind) from --classes / --data / the prior's own class list.

    A label comes from the prior's class list, a --classes file line, the ImageNet id of a named list (1000-class
    models), or the position in the list when the model has exactly that many classes; ValueError otherwise."""
    from .digits import DIGITS_CLASSES

    prior_classes = prior_extra.get("classes")
    if classes is not None:
        entries = resolve_class_entries(classes)
        dataset = classes if classes in NAMED_CLASS_LISTS else "custom"
        if classes in NAMED_CLASS_LISTS and data is not None:
            missing = [name for name, _ in entries if not (Path(data) / name).is_dir()]
            if missing:
                raise ValueError(
                    f"--classes {classes}: --data {data} lacks {len(missing)} of its {len(entries)} class folders "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); for a subset, pass a file "
                    "of 'wnid label' lines as --classes"
                )
    elif data is not None:
        from .imagefolder import scan_image_folder

        entries = [(name, None) for name in scan_image_folder(data)[0]]
        dataset = "custom"
    else:
        entries = [(name, None) for name in (prior_classes or DIGITS_CLASSES)]
        dataset = "digits" if prior_extra.get("dataset", "digits") == "digits" else "custom"
    named = classes in NAMED_CLASS_LISTS
    names, labels = [], []
    for position, (name, label) in enumerate(entries):
        check_class_name(name)
        if prior_classes is not None:
            if name not in prior_classes:
                raise ValueError(f"--classes: the prior knows no class {name!r} (it has {', '.join(prior_classes)})")
            label = prior_classes.index(name)
        elif label is not None and (not named or num_model_classes == 1000):
            pass  # a label from a --classes file, or the ImageNet id of a named list for a 1000-class DiT
        elif num_model_classes == 1000 and name in IMAGENET_INDEX:
            label = IMAGENET_INDEX[name]
        elif num_model_classes == len(entries):
            label = position
        else:
            raise ValueError(
                f"--classes: no model label for class {name!r}; the model has {num_model_classes} "
                "classes, give 'name label' lines in a --classes file"
            )
        if not 0 <= label < num_model_classes:
            raise ValueError(
                f"--classes: class {name!r} maps to label {label}, the model has {num_model_classes} classes"
            )
        names.append(name)
        labels.append(label)
    if len(set(labels)) != len(labels):
        raise ValueError("--classes: two classes map to the same model label")
    return names, labels, dataset
