"""Peak memory of cxr.data.imageio.frame_square alone (the shape rule bypassed) on a 1 x N image: the bounded
decode against the old resize-then-crop. Usage: python benchmarks/decode_memory.py new|old N, under
`/usr/bin/time -v` (docs/robustness.md, "Decode memory")."""
import sys
import numpy as np
from PIL import Image
from cxr.data.imageio import frame_square

def old(image, side):
    width, height = image.size
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return np.array(image.crop((left, top, left + side, top + side)), dtype=np.uint8)

which, length = sys.argv[1], int(sys.argv[2])
image = Image.new("L", (1, length), 90)
print((frame_square if which == "new" else old)(image, 256).shape)
