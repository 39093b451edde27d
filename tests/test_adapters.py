"""Each native adapter on a small fixture written in that dataset's exact file format."""

import csv

import numpy as np
import openpyxl
import pytest
from scipy.io import savemat

from conftest import photo
from liqe_dist.data.adapters import DatasetFormatError, read_dataset, read_label_lists
from liqe_dist.data.adapters.synthetic_dists import KADID_TYPES, TID2013_TYPES


def img(path, size=(240, 240), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(*size, seed=seed).save(path)
    return path


def cell(strings):
    arr = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        arr[0, i] = s
    return arr


def xlsx(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    wb.save(path)


@pytest.fixture
def live_root(tmp_path):
    root = tmp_path / "databaserelease2"
    counts = {"jp2k": 2, "jpeg": 2, "wn": 1, "gblur": 1, "fastfading": 1}
    for folder, n in counts.items():
        for k in range(1, n + 1):
            img(root / folder / f"img{k}.bmp")
        (root / folder / "info.txt").write_text("not an image")
    dmos = np.array([[30.0, 0.0, 45.0, 60.0, 20.0, 55.0, 70.0]])
    orgs = np.array([[0, 1, 0, 0, 0, 0, 0]])
    savemat(root / "dmos.mat", {"dmos": dmos, "orgs": orgs})
    refs = ["bikes.bmp", "bikes.bmp", "parrots.bmp", "bikes.bmp", "house.bmp", "parrots.bmp", "house.bmp"]
    savemat(root / "refnames_all.mat", {"refnames_all": cell(refs)})
    return root


def test_live(live_root):
    recs = read_dataset("live", live_root)
    assert len(recs) == 6  # the reference entry (orgs = 1) is left out
    by_key = {r.key: r for r in recs}
    r = by_key["live_jp2k_img1"]
    assert r.mos == 70.0 and r.distortion_fine == "jp2k" and r.distortion == "jpeg2000 compression"
    assert r.reference == "bikes" and r.path.endswith("jp2k/img1.bmp")
    assert by_key["live_fastfading_img1"].distortion == "jpeg2000 compression"
    assert by_key["live_wn_img1"].distortion == "noise" and by_key["live_gblur_img1"].mos == 45.0
    assert not any(r.scenes for r in recs)  # LIVE has no scene labels: none invented


def test_live_count_mismatch_names_the_file(live_root):
    (live_root / "wn" / "img2.bmp").write_bytes((live_root / "wn" / "img1.bmp").read_bytes())
    with pytest.raises(DatasetFormatError, match=r"dmos\.mat: 7 DMOS.*8 images"):
        read_dataset("live", live_root)


def test_csiq(tmp_path):
    root = tmp_path / "CSIQ"
    img(root / "dst_imgs" / "awgn" / "1600.AWGN.1.png")
    img(root / "dst_imgs" / "jpeg2000" / "1600.jpeg2000.3.png")
    img(root / "dst_imgs" / "fnoise" / "cactus.fnoise.2.png")
    xlsx(root / "csiq.DMOS.xlsx", ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"],
         [[1600, 1, "noise", 1, 0.05, 0.06], [1600, 3, "jpeg 2000", 3, 0.1, 0.3], ["cactus", 6, "f noise", 2, 0.07, 0.2]])
    recs = {r.key: r for r in read_dataset("csiq", root)}
    assert set(recs) == {"csiq_dst_imgs_awgn_1600_AWGN_1", "csiq_dst_imgs_jpeg2000_1600_jpeg2000_3",
                         "csiq_dst_imgs_fnoise_cactus_fnoise_2"}
    r = recs["csiq_dst_imgs_jpeg2000_1600_jpeg2000_3"]
    assert r.mos == pytest.approx(0.7) and r.mos_std == 0.1 and r.distortion == "jpeg2000 compression"
    assert r.reference == "1600"
    assert recs["csiq_dst_imgs_fnoise_cactus_fnoise_2"].distortion == "noise"


def test_kadid(tmp_path):
    root = tmp_path / "kadid10k"
    img(root / "images" / "I01_01_01.png")
    img(root / "images" / "I02_16_05.png")
    (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
                                   "I02_16_05.png,I02.png,2.1,0.25\n")
    recs = {r.key: r for r in read_dataset("kadid10k", root)}
    r = recs["kadid10k_I01_01_01"]
    assert r.mos == 4.57 and r.mos_std == pytest.approx(0.496 ** 0.5) and r.distortion_fine == "gaussian blur"
    assert r.distortion == "blur" and r.reference == "I01"
    assert recs["kadid10k_I02_16_05"].distortion == "overexposure"  # brighten
    assert len(KADID_TYPES) == 25


def test_tid2013_case_insensitive_files(tmp_path):
    root = tmp_path / "tid2013"
    img(root / "distorted_images" / "I01_08_1.BMP")
    img(root / "distorted_images" / "i25_24_5.bmp")
    (root / "mos_with_names.txt").write_text("5.51429 i01_08_1.bmp\n3.2 i25_24_5.bmp\n")
    (root / "mos_std.txt").write_text("0.13\n0.2\n")
    recs = read_dataset("tid2013", root)
    assert [r.distortion for r in recs] == ["blur", "blur"] and recs[0].reference == "i01"
    assert recs[0].mos_std == 0.13 and recs[0].path.endswith("I01_08_1.BMP")
    assert len(TID2013_TYPES) == 24


def test_pipal(tmp_path):
    root = tmp_path / "PIPAL"
    img(root / "Distortion_1" / "A0001_00_00.bmp")
    img(root / "Distortion_2" / "A0002_10_03.bmp")
    (root / "Train_Label").mkdir()
    (root / "Train_Label" / "A0001.txt").write_text("A0001_00_00.bmp,1434.2\n")
    (root / "Train_Label" / "A0002.txt").write_text("A0002_10_03.bmp,1502.9\n")
    recs = read_dataset("pipal", root)
    assert [r.mos for r in recs] == [1434.2, 1502.9] and recs[1].reference == "A0002"
    assert recs[1].distortion is None and recs[1].extra == {"pipal_type": "10_03"}


def test_koniq(tmp_path):
    root = tmp_path / "koniq10k"
    img(root / "1024x768" / "826373.jpg")
    (root / "koniq10k_scores_and_distributions.csv").write_text(
        '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n'
        '"826373.jpg",0,1,23,73,3,100,3.78,0.58,72.4\n')
    [r] = read_dataset("koniq10k", root)
    assert r.mos == 3.78 and r.mos_std == 0.58 and r.distortion is None and r.scenes == ()


def test_clive_skips_training_images(tmp_path):
    root = tmp_path / "ChallengeDB_release"
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["10.bmp", "100.bmp"]
    for n in names[:7]:
        img(root / "Images" / "trainingImages" / n)
    for n in names[7:]:
        img(root / "Images" / n)
    (root / "Data").mkdir()
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell(names).T})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.arange(9.0)[None] * 10})
    savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.ones((1, 9))})
    recs = read_dataset("clive", root)
    assert [r.key for r in recs] == ["clive_10", "clive_100"] and [r.mos for r in recs] == [70.0, 80.0]
    assert recs[0].mos_std == 1.0


def test_bid(tmp_path):
    root = tmp_path / "BID"
    img(root / "ImageDatabase" / "DatabaseImage0001.JPG")
    img(root / "ImageDatabase" / "DatabaseImage0012.JPG")
    xlsx(root / "DatabaseGrades.xlsx", ["Image Number", "Average Subjective Grade"], [[1, 3.2], [12, 1.5]])
    recs = read_dataset("bid", root)
    assert [r.key for r in recs] == ["bid_DatabaseImage0001", "bid_DatabaseImage0012"]
    assert [r.mos for r in recs] == [3.2, 1.5]


def test_spaq(tmp_path):
    root = tmp_path / "SPAQ"
    img(root / "TestImage" / "00001.jpg")
    xlsx(root / "Annotations" / "MOS and Image attribute scores.xlsx",
         ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"],
         [["00001.jpg", 42.5, 50, 40, 45, 60, 38]])
    [r] = read_dataset("spaq", root)
    assert r.mos == 42.5 and r.extra["sharpness"] == 38.0


def write_list(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


def test_reference_label_lists_with_given_splits(tmp_path):
    images = tmp_path / "img"
    a = ["a.bmp", 50.0, "gaussian blur", "animal", "plant", "invalid"]
    b = ["b.bmp", 30.0, "jpeg compression", "human", "invalid", "invalid"]
    c = ["c.bmp", 70.0, "realistic noise", "night", "cityscape", "landscape"]
    lists = tmp_path / "splits2"
    write_list(lists / "1" / "x_train_clip.txt", [a, b])
    write_list(lists / "1" / "x_test_clip.txt", [c])
    write_list(lists / "2" / "x_train_clip.txt", [c])
    write_list(lists / "2" / "x_val_clip.txt", [a])
    write_list(lists / "2" / "x_test_clip.txt", [b])
    recs = {r.key: r for r in read_label_lists(lists, images, "x")}
    assert recs["x_a"].splits == "tv" and recs["x_b"].splits == "te" and recs["x_c"].splits == "et"
    assert recs["x_a"].scenes == ("animal", "plant") and recs["x_c"].scenes == ("night", "cityscape", "landscape")
    assert recs["x_a"].distortion == "blur" and recs["x_c"].distortion == "noise"
    assert recs["x_b"].path == str(images / "b.bmp")


def test_label_list_errors_name_the_line(tmp_path):
    lst = tmp_path / "l.txt"
    write_list(lst, [["a.bmp", 1, "blur", "animal", "invalid", "invalid"], ["a.bmp", 2, "blur", "animal", "invalid", "invalid"]])
    with pytest.raises(DatasetFormatError, match=r"duplicate entry 'a.bmp': .*l\.txt:1 and .*l\.txt:2"):
        read_label_lists(lst, tmp_path, "x")
    write_list(lst, [["a.bmp", 1, "blur", "spaceship", "invalid", "invalid"]])
    with pytest.raises(DatasetFormatError, match=r"l\.txt:1: .*unknown scene"):
        read_label_lists(lst, tmp_path, "x")
    write_list(lst, [["a.bmp", "high", "blur", "animal", "invalid", "invalid"]])
    with pytest.raises(DatasetFormatError, match=r"l\.txt.*'high' is not a number"):
        read_label_lists(lst, tmp_path, "x")


def test_generic_csv(tmp_path):
    img(tmp_path / "p" / "one.png")
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos", "std", "distortion", "scenes", "reference"])
        w.writerow(["p/one.png", 3.5, 0.2, "motion blur", "human;indoor", "ref1"])
        w.writerow(["p/two.png", 2.5, "", "", "", "ref1"])
    recs = read_dataset("csv", table, "mine")
    assert recs[0].distortion == "blur" and recs[0].scenes == ("human", "indoor") and recs[0].mos_std == 0.2
    assert recs[1].distortion is None and recs[1].scenes == () and recs[1].reference == "ref1"


def test_unknown_format_and_missing_files(tmp_path):
    with pytest.raises(DatasetFormatError, match="unknown dataset format"):
        read_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetFormatError, match=r"dmos\.mat: missing"):
        read_dataset("live", tmp_path)
