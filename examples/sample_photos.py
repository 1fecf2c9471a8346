"""Copy the real sample photos that scikit-image ships into a folder, for the quickstart.

    python examples/sample_photos.py build/sample-photos
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PHOTOS = {
    "astronaut.png": "astronaut.png",
    "chelsea.png": "cat.png",
    "coffee.png": "coffee.png",
    "rocket.jpg": "rocket.jpg",
    "motorcycle_left.png": "motorcycle.png",
    "hubble_deep_field.jpg": "galaxies.jpg",
    "camera.png": "cameraman.png",
    "coins.png": "coins.png",
    "brick.png": "brick-wall.png",
    "grass.png": "grass.png",
    "moon.png": "moon-surface.png",
    "retina.jpg": "retina.jpg",
}


def main(dest: str) -> None:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for name, new_name in PHOTOS.items():
        shutil.copy2(src / name, out / new_name)
    print(f"{len(PHOTOS)} sample photos in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/sample-photos")
