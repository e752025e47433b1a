"""Office-31 (Saenko et al. 2010): 31 office object classes in three domains, as a TFDS builder.

Amazon (product photos, 2,817 images), DSLR (498) and Webcam (795) are the configs
`office31/amazon`, `office31/dslr` and `office31/webcam`. The dataset cannot be downloaded by
code; download and extract it so that the images lie at
`MANUAL_DIR/{amazon,dslr,webcam}/images/<class>/*.jpg`, then prepare it once:

    python -m xmodal_jax.data.office31 --manual_dir MANUAL_DIR [--data_dir DIR]

Each domain is one `train` split holding all its images (the domain-adaptation protocol trains
on the unlabelled target images and reports accuracy on the same images). Images are stored
resized to 256x256 RGB uint8 (Tensor features: no TensorFlow needed), the size the standard
ResNet-50 recipe crops 224 px from.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from xmodal_jax.errors import UserError

CLASS_NAMES = (
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair",
    "desk_lamp", "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer",
    "letter_tray", "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone",
    "printer", "projector", "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler",
    "tape_dispenser", "trash_can",
)  # fmt: skip
DOMAINS = {"A": "amazon", "D": "dslr", "W": "webcam"}
IMAGE_SIZE = 256
_EXTENSIONS = (".jpg", ".jpeg", ".png")

INSTRUCTIONS = """\
Download Office-31 (e.g. the `office31.tar.gz` linked from the Transfer-Learning-Library or
the original dataset page) and extract it so that the images lie at
`<manual_dir>/amazon/images/<class>/*.jpg`, `<manual_dir>/dslr/images/<class>/*.jpg` and
`<manual_dir>/webcam/images/<class>/*.jpg` (31 class folders each), then run
`python -m xmodal_jax.data.office31 --manual_dir <manual_dir>`."""


def domain_files(manual_dir: str, domain: str) -> list[tuple[str, int]]:
    """(path, label) of every image of `domain`, sorted; one UserError naming what is missing."""
    root = os.path.join(manual_dir, domain, "images")
    if not os.path.isdir(root):
        raise UserError(
            f"Office-31 domain {domain!r} not found: no folder {root}. Put the images at "
            f"{manual_dir}/{domain}/images/<class>/*.jpg.\n{INSTRUCTIONS}"
        )
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    missing, unknown = sorted(set(CLASS_NAMES) - set(found)), sorted(set(found) - set(CLASS_NAMES))
    files = []
    for label, name in enumerate(CLASS_NAMES):
        folder = os.path.join(root, name)
        images = sorted(
            f for f in os.listdir(folder) if f.lower().endswith(_EXTENSIONS)
        ) if name in found else []  # fmt: skip
        if not images and name not in missing:
            missing.append(name)
        files += [(os.path.join(folder, f), label) for f in images]
    if missing or unknown:
        raise UserError(
            f"Office-31 {root} does not hold the 31 class folders of images: missing or empty "
            f"{sorted(missing)}, unexpected {unknown}. Extract the dataset unchanged into "
            f"{manual_dir}."
        )
    return files


def load_image(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """An image file as RGB uint8 [size, size, 3] (resized without keeping the aspect ratio)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


# Run as `python -m`, this file is executed a second time after the package registered it.
class Office31(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Office-31, one config per domain; built from a manual download (see the module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: 256x256 RGB, one train split per domain."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"The {name} domain of Office-31.")
        for name in DOMAINS.values()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # ArrayRecord: random access for Grain, and writable without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Office-31: 31 office object classes in the amazon, dslr and webcam "
            "domains (Saenko et al., ECCV 2010).",
            homepage="https://faculty.cc.gatech.edu/~judy/domainadapt/",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError:
            raise UserError(
                f"Office-31 is not in the manual download folder "
                f"({getattr(dl_manager, '_manual_dir', None)}).\n{INSTRUCTIONS}"
            ) from None
        files = domain_files(manual_dir, self.builder_config.name)
        return {"train": self._generate_examples(files)}

    def _generate_examples(self, files) -> Iterator[tuple[str, dict]]:
        for path, label in files:
            key = os.path.join(*path.split(os.sep)[-2:])  # <class>/<file>: unique per domain
            yield key, {"image": load_image(path), "label": label}


def prepare(
    manual_dir: str, data_dir: str | None = None, domains: tuple[str, ...] | None = None
) -> None:
    """Builds the Office-31 domains (default all three) from `manual_dir` into the TFDS data
    dir, so that `office31/<domain>` works as a dataset name."""
    from xmodal_jax.data import pipeline

    for domain in domains or DOMAINS.values():
        files = domain_files(manual_dir, domain)  # fails early, before writing anything
        builder = tfds.builder(f"office31/{domain}", data_dir=pipeline.data_dir(data_dir))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
        print(f"office31/{domain}: {len(files)} images in {builder.data_dir}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Prepare Office-31 from a manual download.")
    p.add_argument("--manual_dir", required=True, help="holds {amazon,dslr,webcam}/images/")
    p.add_argument(
        "--data_dir", help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    p.add_argument("--domains", nargs="+", default=list(DOMAINS.values()))
    args = p.parse_args(argv)
    try:
        prepare(args.manual_dir, args.data_dir, tuple(args.domains))
    except UserError as e:
        sys.exit(f"office31: error: {e}")


if __name__ == "__main__":
    main()
