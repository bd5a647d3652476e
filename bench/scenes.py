"""Look at the digit scenes: a captioned grid of 64 validation scenes and attribute histograms of a split.

Writes ``bench/results/scenes.png`` (8x8 scenes, each upscaled 4x with its caption under it) and
``bench/results/scenes.json`` (counts of digit count, digits, colours, sizes, relations, backgrounds
and a 4x4 histogram of digit centres over ``--num`` scenes of ``--split``).

    python bench/scenes.py [--split train] [--num 5000] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ditlab.data.scenes import SCENES_NAME, DigitScenes

RESULTS = Path(__file__).resolve().parent / "results"


def grid(scenes: DigitScenes, indices: list[int], zoom: int = 4, columns: int = 8) -> Image.Image:
    """Scenes zoomed ``zoom`` x (nearest) in ``columns`` columns, each with its wrapped caption beneath."""
    side = scenes.size * zoom
    cell_w, cell_h = side + 8, side + 56
    rows = -(-len(indices) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for slot, index in enumerate(indices):
        item = scenes[index]
        pixels = ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        x, y = (slot % columns) * cell_w + 4, (slot // columns) * cell_h + 4
        sheet.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (x, y))
        lines = textwrap.wrap(f"{index}: {item['caption']}", width=side // 6)
        draw.multiline_text((x, y + side + 2), "\n".join(lines), fill="black", spacing=1)
    return sheet


def histograms(scenes: DigitScenes, num: int) -> dict:
    """Attribute counts over the first ``num`` scenes."""
    counts = {key: Counter() for key in ("count", "digit", "colour", "size", "relation", "background", "label")}
    centres = np.zeros((4, 4), dtype=int)
    for attributes in scenes.attributes(range(num)):
        counts["count"][attributes.count] += 1
        counts["relation"][str(attributes.relation)] += 1
        counts["background"][attributes.background] += 1
        counts["label"][attributes.digits[0]] += 1
        for digit, colour, size, (cx, cy) in zip(attributes.digits, attributes.colours, attributes.sizes,
                                                 attributes.positions):  # fmt: skip
            counts["digit"][digit] += 1
            counts["colour"][colour] += 1
            counts["size"][size] += 1
            centres[min(int(cy * 4), 3), min(int(cx * 4), 3)] += 1
    result = {key: {str(k): v for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))}
              for key, counter in counts.items()}  # fmt: skip
    result["centre_grid_4x4_rows_top_to_bottom"] = centres.tolist()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    load_average = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]  # counts only: no timing here
    grid(DigitScenes("validation", args.size), list(range(64))).save(RESULTS / "scenes.png")
    report = {"dataset": SCENES_NAME, "split": args.split, "num_scenes": args.num, "load_average_start": load_average,
              **histograms(DigitScenes(args.split, args.size), args.num)}  # fmt: skip
    (RESULTS / "scenes.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
