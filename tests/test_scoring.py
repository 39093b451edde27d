import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import photo
from liqe_dist import load
from liqe_dist.cli import main
from liqe_dist.data.crops import CropConfig, eval_crops
from liqe_dist.data.images import ImageDecodeError, decode_image
from liqe_dist.eval.scoring import ImageScore, ScoreFailure, Scorer, expand_sources

def direct(model, img, crops=CropConfig()):
    """The model's output for one image, computed without the scorer (crops -> forward)."""
    import torch

    with torch.no_grad():
        return model(eval_crops(img, crops).pixels[None])


BROKEN = {"d_empty.jpg": "empty file", "e_garbage.png": "not a recognised image format",
          "f_truncated.jpg": "truncated"}


def test_decode_errors_name_file_and_reason(image_folder):
    for name, reason in BROKEN.items():
        with pytest.raises(ImageDecodeError, match=reason) as info:
            decode_image(image_folder / name)
        assert info.value.source.endswith(name)
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(image_folder / "nope.jpg")


def test_decompression_bomb_refused(tmp_path):
    photo(300, 300).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(tmp_path / "big.png", max_pixels=300 * 299)


def test_score_iter_reports_failures_in_order(image_folder, tiny_liqe):
    sources, missing = expand_sources([image_folder])
    assert not missing and len(sources) == 6
    results = list(Scorer(tiny_liqe, batch_images=4).score_iter(sources))
    assert [Path(r.source).name for r in results] == sorted(p.name for p in image_folder.iterdir())
    failures = {Path(r.source).name: r.reason for r in results if isinstance(r, ScoreFailure)}
    assert set(failures) == set(BROKEN)
    for name, reason in BROKEN.items():
        assert reason in failures[name]
    scores = [r for r in results if isinstance(r, ImageScore)]
    assert [s.upsampled for s in scores] == [False, False, True]
    for s in scores:  # each score is the model's own q_hat for that image
        out = direct(tiny_liqe, decode_image(s.source))
        assert s.quality == pytest.approx(out.score.item(), abs=1e-5)
        scene, scene_prob = s.heads["scene"]
        assert scene == tiny_liqe.vocabulary.scenes[out.scene.argmax()]
        assert scene_prob == pytest.approx(out.scene.max().item(), abs=1e-6)


def test_batching_does_not_change_scores(image_folder, tiny_liqe):
    sources = [str(image_folder / n) for n in ("a_good.png", "b_good.jpg", "c_small.png")]
    one = Scorer(tiny_liqe, batch_images=1).score(sources)
    three = Scorer(tiny_liqe, batch_images=3).score(sources)
    for a, b in zip(one, three):
        assert a.quality == pytest.approx(b.quality, abs=1e-5)
        assert [x[0] for x in a.heads.values()] == [x[0] for x in b.heads.values()]


def test_api_scores_pil_images_and_raises_on_bad_input(image_folder):
    scorer = load("liqe-tiny")
    [s] = scorer.score(photo(300, 240))
    out = direct(scorer.model, photo(300, 240))
    assert s.quality == pytest.approx(out.score.item(), abs=1e-5)
    assert s.heads["distortion"][0] == scorer.model.vocabulary.distortions[out.distortion.argmax()]
    with pytest.raises(ImageDecodeError, match="e_garbage.png"):
        scorer.score([image_folder / "a_good.png", str(image_folder / "e_garbage.png")])


def test_refuse_small_images_is_reported(image_folder, tiny_liqe):
    scorer = Scorer(tiny_liqe, CropConfig(small_images="refuse"))
    [r] = list(scorer.score_iter([str(image_folder / "c_small.png")]))
    assert isinstance(r, ScoreFailure) and "150x100" in r.reason


def test_cli_skips_bad_files_and_writes_the_rest(image_folder, tmp_path, caplog):
    out = tmp_path / "scores.jsonl"
    listing = tmp_path / "list.txt"
    listing.write_text("images/a_good.png\n# a comment\nimages/e_garbage.png\n")
    code = main(["score", str(image_folder), str(listing), str(tmp_path / "missing_dir"),
                 "--model", "liqe-tiny", "--format", "jsonl", "-o", str(out), "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4  # 3 good in the folder + 1 from the list
    assert {"quality", "scene", "distortion", "upsampled"} <= set(rows[0])
    log = caplog.text
    for name, reason in BROKEN.items():
        assert name in log and reason in log
    assert "missing_dir: no such file or folder" in log
    assert "scored 4 image(s), skipped 5" in log


def test_cli_fails_when_nothing_scores(image_folder, tmp_path):
    code = main(["score", str(image_folder / "d_empty.jpg"), str(image_folder / "e_garbage.png"),
                 "--model", "liqe-tiny", "-o", str(tmp_path / "x.csv"), "--no-progress"])
    assert code == 1


@pytest.mark.slow
def test_console_script_csv(image_folder):
    exe = Path(sys.executable).with_name("liqe-dist")
    proc = subprocess.run([str(exe), "score", str(image_folder / "a_good.png"), "--model", "liqe-tiny",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("source,quality,scene,scene_prob,distortion")
    assert lines[1].startswith(str(image_folder / "a_good.png"))
    assert "random weights" in proc.stderr


def test_unusable_checkpoint_is_one_line_naming_the_file(tmp_path, image_folder, caplog):
    garbage = tmp_path / "weights.pt"
    garbage.write_text("not a checkpoint")
    assert main(["score", str(image_folder / "a_good.png"), "--model", "liqe-tiny", "--checkpoint", str(garbage)]) == 2
    assert "weights.pt: cannot be read with torch.load(weights_only=True)" in caplog.text
    assert main(["score", str(image_folder / "a_good.png"), "--model", "ViT-Q-99"]) == 2
    assert "unknown model 'ViT-Q-99'" in caplog.text


def test_file_names_that_are_not_utf8_round_trip(tmp_path, capsysbinary):
    """A Latin-1 name (b'caf\\xe9.png') in a folder and in a list file: every row is written, and
    the path read back from the output names the same file."""
    import csv as csv_module
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    latin = os.fsdecode(b"caf\xe9.png")  # not valid UTF-8: a surrogate escape in the str
    photo(240, 240, 1).save(folder / latin)
    photo(240, 240, 2).save(folder / "plain.png")
    (tmp_path / "list.txt").write_bytes(b"imgs/caf\xe9.png\nimgs/plain.png\n")
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), str(tmp_path / "list.txt"), "--model", "liqe-tiny", "--no-progress",
                 "-o", str(out)]) == 0
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv_module.DictReader(f))
    assert len(rows) == 4
    assert all(os.path.exists(r["source"]) for r in rows)
    assert sum(r["source"].endswith(latin) for r in rows) == 2
    assert b"caf\xe9.png" in out.read_bytes()  # the name's own bytes
    assert main(["score", str(tmp_path / "list.txt"), "--model", "liqe-tiny", "--no-progress", "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert [os.path.exists(r["source"]) for r in lines] == [True, True]
