import pytest
from PIL import Image

from tilevlm.cli import main


def test_inspect_prints_the_tiling_and_saves_a_png(tmp_path, photo, capsys):
    path = tmp_path / "photo.jpg"
    photo(1000, 600).save(path, quality=90)
    out_png = tmp_path / "figs" / "tiles.png"
    assert main(["inspect", str(path), "--preset", "tiny", "--save-png", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "original:     1000x600" in out
    assert "resized:      96x64" in out
    assert "grid:         2x3" in out
    assert "tiles:        7 (incl. 1 global thumbnail)" in out
    assert "image tokens: 28 (7 tiles x 4" in out  # the placeholders: tiles x tokens per tile
    assert "prompt tokens: 35 (the image tokens + 7 of the tilevlm layout's markers" in out
    with Image.open(out_png) as fig:
        assert fig.format == "PNG" and fig.width > 96 * 2


def test_inspect_default_preset_single_tile(tmp_path, photo, capsys):
    path = tmp_path / "small.png"
    photo(200, 150).save(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "grid:         1x1" in out and "tiles:        1\n" in out and "image tokens: 49 " in out


@pytest.mark.parametrize("content", [b"", b"GIF89a garbage", None])
def test_inspect_bad_input_exits_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tilevlm inspect: error: {path}: ")


def test_draw_tiles_title_lines_and_size_check(photo):
    from tilevlm.preprocessing.tile_figure import draw_tiles

    img = photo(96, 64)
    fig = draw_tiles(img, (2, 3), 32, title="Q: what is in r1c2?\nA: " + "a long answer " * 20)
    no_title = draw_tiles(img, (2, 3), 32)
    assert fig.height > no_title.height + 40  # several wrapped lines
    assert fig.width == no_title.width
    with pytest.raises(ValueError, match="does not match"):
        draw_tiles(img, (3, 3), 32)
