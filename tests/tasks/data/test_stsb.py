"""STS-B as distributed: quotes, CRLF and extra fields read right; broken files are one line naming the file."""

from __future__ import annotations

import pytest
from conftest import STSB_DIR

from tasks.core.errors import InputError
from tasks.data.stsb import read_pairs


def test_reads_all_test_pairs_despite_quotes_crlf_and_extra_fields():
    pairs = read_pairs(STSB_DIR / "sts-test.csv")
    assert len(pairs) == 1379
    assert pairs["score"].between(0, 5).all()
    assert not pairs["sentence2"].str.endswith("\r").any()
    assert len(read_pairs(STSB_DIR / "sts-train.csv")) == 5749


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no sentence pairs"),
        (b"a\tb\tc\n", "expected 7 tab-separated fields"),
        (b"g\ts\t2012\t1\tfive\tA.\tB.\n", "score"),
        (b"g\ts\t2012\t1\t9.0\tA.\tB.\n", "score"),
        (b"g\ts\t2012\t1\t1.0\t\xff\xfe\tB.\n", "not UTF-8"),
    ],
)
def test_bad_stsb_files(tmp_path, content, message):
    path = tmp_path / "sts-test.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        read_pairs(path)
    assert str(path) in str(err.value)
