"""datasets: the original's split and labels, real-world CSV quirks, clear errors."""

import csv
import os

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from datasets import (
    ROC_HEADER,
    ROC_TEST,
    ROC_VAL,
    SEED,
    DataError,
    read_classification_csv,
    read_csv_rows,
    read_multiple_choice_csv,
    read_text,
    rocstories,
    rocstories_test_labels,
)
from synthetic import write_synthetic_rocstories


def original_rocstories(path):
    """The original reader, written out from docs/reference.md §5."""
    with open(path, encoding="utf_8") as f:
        rows = list(csv.reader(f))[1:]
    return ([" ".join(r[1:5]) for r in rows], [r[5] for r in rows], [r[6] for r in rows],
            [int(r[-1]) - 1 for r in rows])


def test_split_reproduces_the_original(tmp_path):
    write_synthetic_rocstories(tmp_path, n_val=60, n_test=20, seed=3)
    (trX1, trX2, trX3, trY), (vaX1, vaX2, vaX3, vaY), (teX1, teX2, teX3) = rocstories(tmp_path, n_valid=15)
    st, c1, c2, y = original_rocstories(tmp_path / ROC_VAL)
    expected = train_test_split(st, c1, c2, y, test_size=15, random_state=SEED)
    assert (trX1, vaX1, trX2, vaX2, trX3, vaX3) == tuple(expected[:6])
    assert trY.tolist() == expected[6] and vaY.tolist() == expected[7]
    assert len(trX1) == 45 and trY.dtype == np.int32
    assert (teX1, teX2, teX3) == tuple(original_rocstories(tmp_path / ROC_TEST)[:3])
    assert rocstories_test_labels(tmp_path).tolist() == original_rocstories(tmp_path / ROC_TEST)[3]


def test_default_sizes_are_the_papers(tmp_path):
    write_synthetic_rocstories(tmp_path, n_val=1871, n_test=5, seed=0)
    train, valid, _ = rocstories(tmp_path)
    assert (len(train[0]), len(valid[0])) == (1497, 374)


def write_rows(path, rows, encoding="utf-8", newline="\n", header=ROC_HEADER):
    with open(path, "w", encoding=encoding, newline="") as f:
        csv.writer(f, lineterminator=newline).writerows([header, *rows])


def story_row(i, label="1", ending1="Right.", ending2="Wrong."):
    return [f"id{i}", f"S1 of {i}.", "S2.", "S3.", "S4.", ending1, ending2, label]


def quirky_folder(tmp_path):
    rows = [story_row(i) for i in range(6)]
    rows[1][1] = 'He said, "Stop, now!"'          # quotes and commas inside a quoted field
    rows[2][5] = "First line\nsecond line"       # a newline inside a field
    rows[3] = rows[3] + ["", ""]                 # trailing empty cells from a spreadsheet
    rows[4][7] = " 2 "                           # blanks around the label
    write_rows(tmp_path / ROC_VAL, rows, encoding="utf-8-sig", newline="\r\n")  # BOM + CRLF
    with open(tmp_path / ROC_TEST, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([ROC_HEADER, story_row(9), [], story_row(10)])  # a blank line


def test_real_world_quirks(tmp_path):
    quirky_folder(tmp_path)
    train, valid, test = rocstories(tmp_path, n_valid=2)
    stories = dict(zip(train[0] + valid[0], train[1] + valid[1]))
    assert 'He said, "Stop, now!" S2. S3. S4.' in stories
    assert "First line\nsecond line" in stories.values()
    assert sorted(train[3].tolist() + valid[3].tolist()) == [0, 0, 0, 0, 0, 1]
    assert test[0] == ["S1 of 9. S2. S3. S4.", "S1 of 10. S2. S3. S4."]


def test_test_file_without_labels(tmp_path):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=3)
    write_rows(tmp_path / ROC_TEST, [story_row(i)[:7] for i in range(3)], header=ROC_HEADER[:7])
    assert len(rocstories(tmp_path, n_valid=2)[2][0]) == 3
    assert rocstories_test_labels(tmp_path) is None
    write_rows(tmp_path / ROC_TEST, [story_row(i, label="") for i in range(3)])  # blind labels
    assert len(rocstories(tmp_path, n_valid=2)[2][0]) == 3
    assert rocstories_test_labels(tmp_path) is None


@pytest.mark.parametrize("mutate, match", [
    (lambda rows: rows.__setitem__(2, rows[2][:6]), r"line 4: expected 8 columns, found 6"),
    (lambda rows: rows[1].__setitem__(7, "3"), r"line 3: label '3' is not one of 1, 2"),
    (lambda rows: rows[0].__setitem__(2, "  "), r"line 2: the sentence 2 is empty"),
    (lambda rows: rows[3].__setitem__(6, ""), r"line 5: the ending 2 is empty"),
    (lambda rows: rows[1].__setitem__(7, ""), r"line 3: the right ending \(1 or 2\) is empty"),
    (lambda rows: rows[1].__setitem__(slice(6, 8), ["", ""]), r"line 3: the ending 2 is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, mutate, match):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=3)
    rows = [story_row(i) for i in range(8)]
    mutate(rows)
    write_rows(tmp_path / ROC_VAL, rows)
    with pytest.raises(DataError, match=ROC_VAL.replace("(", r"\(") + ", " + match):
        rocstories(tmp_path, n_valid=2)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; it must hold: cloze_test_val.*rochester"):
        rocstories(tmp_path / "nowhere")
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=3)
    os.remove(tmp_path / ROC_TEST)
    with pytest.raises(DataError, match=r"lacks 'cloze_test_test__spring2016 - cloze_test_ALL_test.csv'"):
        rocstories(tmp_path)
    with pytest.raises(DataError, match=r"data folder .*ALL_val.csv' is a file; --data_dir is the folder that holds: "
                                        r"cloze_test_val"):
        rocstories(str(tmp_path / ROC_VAL))


def test_header_and_encoding_errors(tmp_path):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=3)
    (tmp_path / ROC_VAL).write_bytes(b"")
    with pytest.raises(DataError, match="empty; expected a header"):
        rocstories(tmp_path)
    (tmp_path / ROC_VAL).write_bytes(b"a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="line 1: expected a header of 8 columns"):
        rocstories(tmp_path)


def test_own_classification_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"Great, really great",pos\nAwful,neg\n"Fine\nok",pos\n', encoding="utf-8")
    texts, labels, names = read_classification_csv(path)
    assert texts == ["Great, really great", "Awful", "Fine\nok"] and names == ["neg", "pos"]
    assert labels.tolist() == [1, 0, 1]
    with pytest.raises(DataError, match=r"line 1: column\(s\) 'sentence' not in the header"):
        read_classification_csv(path, text_column="sentence")
    with pytest.raises(DataError, match=r"line 3: label 'neg' is not one of pos"):
        read_classification_csv(path, labels=["pos"])


def test_own_multiple_choice_csv(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("question,a,b,c,answer\nSky?,blue,green,red,1\nGrass?,blue,green,red,b\n", encoding="utf-8")
    contexts, endings, labels = read_multiple_choice_csv(path, "question", ["a", "b", "c"], "answer")
    assert contexts == ["Sky?", "Grass?"] and endings[1] == ["green", "green"] and labels.tolist() == [0, 1]
    path.write_text("question,a,b,answer\nSky?,blue,,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: the b is empty"):
        read_multiple_choice_csv(path, "question", ["a", "b"], "answer")


# ------------------------------------------------------------------------------------------------
# Bytes that are not UTF-8: every reader names the line and column of the first one
# ------------------------------------------------------------------------------------------------

def first_bad_byte(data):
    """(line, column, byte) of the first byte that is not UTF-8, found independently of
    datasets.py: decode line by line (splitlines on the csv module's line ends), then character
    by character."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for line_no, line in enumerate(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"), start=1):
        text = line.decode("utf-8", errors="replace")
        if "\ufffd" in text:
            column = text.index("\ufffd") + 1
            good = len(text[:column - 1].encode("utf-8"))
            return line_no, column, line[good]


def latin1_csv(path, rows, bad_row, bad_cell, newline="\n", bom=False):
    """A CSV file in UTF-8 except one cell written in Latin-1 (what a spreadsheet export may do)."""
    lines = []
    for i, row in enumerate(rows):
        cells = [c.encode("latin-1" if (i, j) == (bad_row, bad_cell) else "utf-8") for j, c in enumerate(row)]
        lines.append(b",".join(cells))
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.encode().join(lines) + newline.encode())
    return first_bad_byte(path.read_bytes())


READERS = {
    "rocstories val": (lambda d: rocstories(d, n_valid=2), ROC_VAL, [ROC_HEADER] + [story_row(i) for i in range(6)]),
    "rocstories test": (lambda d: rocstories(d, n_valid=2), ROC_TEST, [ROC_HEADER] + [story_row(i) for i in range(6)]),
    "test labels": (rocstories_test_labels, ROC_TEST, [ROC_HEADER] + [story_row(i) for i in range(6)]),
    "classification": (lambda d: read_classification_csv(d / "own.csv"), "own.csv",
                       [["text", "label"]] + [[f"text {i}", "pos"] for i in range(6)]),
    "multiple choice": (lambda d: read_multiple_choice_csv(d / "own.csv", "q", ["a", "b"], "y"), "own.csv",
                        [["q", "a", "b", "y"]] + [[f"q{i}", "x", "y", "1"] for i in range(6)]),
    "csv rows": (lambda d: read_csv_rows(d / "own.csv"), "own.csv", [["a", "b"]] + [["1", "2"]] * 6),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("newline, bom", [("\n", False), ("\r\n", True)])
def test_undecodable_bytes_name_line_and_column(tmp_path, reader, newline, bom):
    read, name, rows = READERS[reader]
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=3)
    rows = [list(r) for r in rows]
    rows[4][1] = "Café naïve"  # 0xe9 in Latin-1, after 3 good characters of the cell
    line, column, byte = latin1_csv(tmp_path / name, rows, bad_row=4, bad_cell=1, newline=newline, bom=bom)
    assert (line, byte) == (5, 0xE9)
    prefix = len(",".join(rows[4][:1])) + 1 + len("Caf")
    assert column == prefix + 1
    with pytest.raises(DataError) as err:
        read(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / name}, line {line}, column {column}: not UTF-8 text (byte 0xe9")


def test_read_text_counts_characters_and_every_line_end(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes("é€\r\n".encode() + b"a\rb\n" + "日本".encode() + b"\xff rest\n")
    assert first_bad_byte(path.read_bytes()) == (4, 3, 0xFF)
    with pytest.raises(DataError, match=r"x.csv, line 4, column 3: not UTF-8 text \(byte 0xff: invalid start byte\)"):
        read_text(path)
    path.write_bytes(b"\xef\xbb\xbfok\r\nline two\n")
    assert read_text(path) == "ok\r\nline two\n"
    path.write_bytes(b"ab\xe2\x82")  # a character cut off at the end of the file
    with pytest.raises(DataError, match=r"line 1, column 3: not UTF-8 text \(byte 0xe2: unexpected end of data\)"):
        read_text(path)
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "none.csv")


def test_tsv_rows(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\tb\n1,5\t2\n\n3\t4\n", encoding="utf-8")
    assert read_csv_rows(path, delimiter="\t") == (["a", "b"], [(2, ["1,5", "2"]), (4, ["3", "4"])])
