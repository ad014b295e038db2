"""Draw the book's logo and favicon: a normalized histogram under the standard normal curve.

    python scripts/make_logo.py

writes book/_static/logo.svg (the sidebar logo) and book/_static/favicon.png (64 x 64, drawn
with Pillow at 4x and scaled down). The bars are the standard normal density at the bar centres,
so the picture is what batch normalization promises: zero mean, unit variance. Colours are the
book's "BN" blue, "raw" red and "no BN" grey (bncore.plotting.COLORS); the
grey baseline reads on the light and the dark theme alike.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

STATIC = Path(__file__).resolve().parents[1] / "book" / "_static"
BLUE, RED, INK, GREY = "#1f77b4", "#d62728", "#2b2b2b", "#7f7f7f"


def density(z: float) -> float:
    """The standard normal density, scaled to 1 at z = 0."""
    return math.exp(-z * z / 2)


def curve_points(x0: float, x1: float, base: float, height: float, zmax: float = 3.2,
                 n: int = 48) -> list[tuple[float, float]]:
    """The bell curve from z = -zmax to zmax, mapped onto [x0, x1] with its peak `height` up."""
    points = []
    for i in range(n + 1):
        z = -zmax + 2 * zmax * i / n
        x = x0 + (x1 - x0) * i / n
        points.append((x, base - height * density(z)))
    return points


def bars(x0: float, x1: float, base: float, height: float, count: int, zmax: float = 3.2,
         gap: float = 0.18) -> list[tuple[float, float, float, float]]:
    """`count` histogram bars (left, top, right, bottom) under the curve on [x0, x1]."""
    width = (x1 - x0) / count
    out = []
    for i in range(count):
        z = -zmax + 2 * zmax * (i + 0.5) / count
        left = x0 + i * width + gap * width / 2
        out.append((left, base - height * density(z), left + width * (1 - gap), base))
    return out


def logo_svg() -> str:
    size, x0, x1, base, height = 64, 4.0, 60.0, 54.0, 42.0
    rects = "\n".join(
        f'  <rect x="{l:.2f}" y="{t:.2f}" width="{r - l:.2f}" height="{b - t:.2f}" rx="1"/>'
        for l, t, r, b in bars(x0, x1, base, height * 0.92, 9))
    path = " ".join(f"{'M' if i == 0 else 'L'}{x:.2f},{y:.2f}"
                    for i, (x, y) in enumerate(curve_points(x0, x1, base, height)))
    return f"""<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" \
width="{size * 2}" height="{size * 2}" role="img" aria-labelledby="title">
<title id="title">Batch Normalization, from first principles</title>
<g fill="{BLUE}" fill-opacity="0.85">
{rects}
</g>
<path d="{path}" fill="none" stroke="{RED}" stroke-width="2.6" stroke-linecap="round" \
stroke-linejoin="round"/>
<line x1="{x0 - 1}" y1="{base + 1.5}" x2="{x1 + 1}" y2="{base + 1.5}" stroke="{GREY}" \
stroke-width="2" stroke-linecap="round"/>
</svg>
"""


def favicon_png(size: int = 64, scale: int = 4) -> Image.Image:
    """Fewer, bolder bars than the logo, so the picture survives at 16 x 16."""
    s = size * scale
    img = Image.new("RGBA", (s, s), (255, 255, 255, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((0, 0, s - 1, s - 1), radius=12 * scale, fill="white")
    x0, x1, base, height = 6 * scale, 58 * scale, 54 * scale, 44 * scale
    for l, t, r, b in bars(x0, x1, base, height * 0.9, 5, zmax=2.6, gap=0.14):
        draw.rectangle((l, t, r, b), fill=BLUE)
    draw.line(curve_points(x0, x1, base, height, zmax=2.6), fill=RED, width=5 * scale,
              joint="curve")
    draw.line((x0, base + 2 * scale, x1, base + 2 * scale), fill=INK, width=3 * scale)
    return img.resize((size, size), Image.LANCZOS)


def main() -> None:
    STATIC.mkdir(parents=True, exist_ok=True)
    (STATIC / "logo.svg").write_text(logo_svg())
    favicon_png().save(STATIC / "favicon.png", optimize=True)
    print(f"wrote {STATIC / 'logo.svg'} and {STATIC / 'favicon.png'}")


if __name__ == "__main__":
    main()
