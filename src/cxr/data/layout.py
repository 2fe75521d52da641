"""Where the dataset is and what it looks like: class names, the folder layout, finding (or downloading) the
dataset. Nothing here imports torch, so commands can check their arguments before the heavy imports.

Layout: ``<root>/{train,val,test}/<CLASS>/*.{jpg,jpeg,png,dcm}``; the Kaggle archive spells the
tuberculosis folder ``TURBERCULOSIS`` and may nest the split folders one or two levels down.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CLASSES: tuple[str, ...] = ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")
FOLDER_ALIASES = {"TURBERCULOSIS": "TUBERCULOSIS"}
SPLITS = ("train", "val", "test")
KAGGLE_HANDLE = "jtiptj/chest-xray-pneumoniacovid19tuberculosis"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EXPECTED_LAYOUT = (
    "Expected layout: DATA_DIR/{train,val,test}/{COVID19,NORMAL,PNEUMONIA,TUBERCULOSIS}/*.jpg|jpeg|png|dcm "
    "(the Kaggle spelling TURBERCULOSIS is accepted; the split folders may sit one or two levels down)."
)

# Class folder names of external and added training folders: case, spaces, hyphens and underscores ignored.
SPELLINGS = {**FOLDER_ALIASES, "TB": "TUBERCULOSIS", "COVID": "COVID19", "COVID2019": "COVID19",
             "PNEUMONIAS": "PNEUMONIA", "HEALTHY": "NORMAL"}
EXPECTED_CLASS_FOLDERS = ("expected class folders named (in any case) COVID19 (or COVID-19, COVID), NORMAL, PNEUMONIA "
                          "and TUBERCULOSIS (or TB), directly in the folder or under a test/ folder")


class DatasetError(RuntimeError):
    """The dataset cannot be found or used; the message says what to do."""


def visible_name(name: str) -> str:
    """A folder name as a warning should show it: plain when it is printable ASCII without spaces at its
    ends; else quoted with escapes (``'Normal '``, ``'N\\u041eRMAL'`` for a Cyrillic O), and the class it
    mimics named, so a folder that looks like a class but is not one can be seen and renamed."""
    if name.isascii() and name.isprintable() and name == name.strip():
        return name
    key = name.rsplit("/", 1)[-1].strip().upper()  # a folder's own name, also below a split ("train/...")
    mimics = next((c for c in CLASSES if len(c) == len(key)
                   and all(a == b or not a.isascii() for a, b in zip(key, c))), None)
    return ascii(name) + (f" (looks like {mimics}, but is another name)" if mimics else "")


def child_dirs(path: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in path.iterdir() if p.is_dir()} if path.is_dir() else {}


def find_split_root(path: Path, max_depth: int = 3) -> Path | None:
    """Return the folder under ``path`` (searched breadth first) that holds ``train`` and ``test``."""
    frontier = [Path(path)]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in sorted(frontier):
            children = child_dirs(folder)
            if "train" in children and "test" in children:
                return folder
            next_frontier.extend(children.values())
        frontier = next_frontier
    return None


def is_dataset_root(folder: Path) -> bool:
    """Whether ``folder`` holds ``train/`` and ``test/``, each with at least one class folder."""
    children = child_dirs(folder)
    names = set(CLASSES) | set(FOLDER_ALIASES)
    return all(split in children and any(name.upper() in names for name in child_dirs(children[split]))
               for split in ("train", "test"))


def find_dataset_roots(base: Path, max_depth: int = 5) -> list[Path]:
    """Every folder under ``base`` laid out as the dataset (see :func:`is_dataset_root`), whatever it is
    called: an attached copy or fork of the Kaggle dataset has its own folder name. A found root is not
    searched further."""
    found, frontier = [], [Path(base)]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in sorted(frontier):
            if is_dataset_root(folder):
                found.append(folder)
            else:
                next_frontier.extend(child_dirs(folder).values())
        frontier = next_frontier
    return sorted(found)


def find_attached_dataset(input_root: Path) -> Path:
    """The one dataset under a Kaggle input root (found by its layout, whatever its folder is called);
    no dataset, or more than one, is an error that says what the input root holds."""
    roots = find_dataset_roots(input_root)
    if len(roots) == 1:
        return roots[0]
    if roots:
        raise DatasetError(f"{len(roots)} copies of the dataset under {str(input_root)!r}: "
                           f"{', '.join(map(str, roots))}. Attach one, or choose with CXR_DATA_DIR.")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(input_root).iterdir())
    found = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "") or "nothing"
    raise DatasetError(f"No dataset under {str(input_root)!r} (it holds {found}). Attach the Kaggle dataset "
                       f"{KAGGLE_HANDLE} (Add Input) or a copy of it. {EXPECTED_LAYOUT}")


def download_dataset(handle: str = KAGGLE_HANDLE) -> Path:
    """Download (or reuse kagglehub's cached copy of) the public Kaggle dataset.

    No interactive login: the dataset is public, and kagglehub uses credentials only when they
    are already configured (``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME``/``KAGGLE_KEY``).
    """
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(handle))
    except Exception as error:  # kagglehub raises many types (network, auth, HTTP); all mean the same here
        raise DatasetError(
            f"Could not download the Kaggle dataset {handle!r} with kagglehub "
            f"({type(error).__name__}: {error}). If this machine is offline or has no Kaggle access, "
            "download the dataset elsewhere and pass its folder with --data-dir DATA_DIR (or set "
            f"CXR_DATA_DIR). {EXPECTED_LAYOUT}"
        ) from None


def locate_dataset(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the split root: explicit ``data_dir`` first, then ``CXR_DATA_DIR``, then a kagglehub download."""
    source = data_dir or os.environ.get("CXR_DATA_DIR")
    if source:
        base = Path(source).expanduser()
        if not base.exists():
            raise DatasetError(f"Data folder {str(base)!r} does not exist. {EXPECTED_LAYOUT}")
    else:
        base = download_dataset()
    root = find_split_root(base)
    if root is None:
        raise DatasetError(f"No train/ and test/ folders found in {str(base)!r}. {EXPECTED_LAYOUT}")
    return root


def relative_path(path: Path, root: Path) -> str:
    """``path`` below ``root`` as a POSIX path (string work: ``Path.relative_to`` cost seconds per 7,000 files)."""
    prefix, text = os.path.join(str(root), ""), str(path)
    return text[len(prefix):].replace(os.sep, "/") if text.startswith(prefix) else text


def class_of(folder_name: str) -> str | None:
    """The class a folder name stands for (case, spaces, hyphens and underscores ignored), or None."""
    key = re.sub(r"[^A-Z0-9]", "", folder_name.upper())
    key = SPELLINGS.get(key, key)
    return key if key in CLASSES else None
