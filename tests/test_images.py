import json

import torch
from PIL import Image

from ldm.images import make_grid, save_grid, save_png, to_uint8


def test_uint8_mapping():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255, 255]


def test_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(5)])
    g = make_grid(imgs, nrow=3, padding=1, pad_value=-1)
    assert g.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    assert g[0, 1, 1] == 0 and g[0, 1, 4] == 1 and g[0, 4, 1] == 3 and g[0, 4, 7] == -1  # empty 6th cell


def test_png_text_chunks(tmp_path):
    p = save_png(torch.zeros(3, 4, 4), tmp_path / "a.png", {"prompt": "a sneaker", "seed": 3, "guidance": 4.0})
    im = Image.open(p)
    assert im.mode == "RGB" and im.size == (4, 4)
    assert im.text["prompt"] == "a sneaker" and json.loads(im.text["seed"]) == 3
    g = save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "g.png", nrow=2)
    assert Image.open(g).mode == "L"
