"""Hostile and random input: property-based tests of the seed text and CSV readers.

Hypothesis writes input files that mix valid rows with hostile lines (arbitrary bytes,
invalid UTF-8, NUL, CR, ESC and tabs, Latin-1 / UTF-16 / UTF-32 text, wrong field counts,
numbers such as 'nan', '1e999', '-0' or '１２', huge integers, empty fields, junk in
sequences; for CSV also quotes, line breaks and delimiters in cells) and runs the whole
prepare job on them. The property: nothing crashes. The job either stops with a
``PrepareError`` that names the table and says why, or every input row is accounted for:
per table read == accepted + rejected and read is the number of rows written, the rejects
output holds exactly the rejected rows, each once, with a reason and a row number in
1..read; rows that cannot be valid (blank, wrong field count) are among the rejects, and
the valid rows written are accepted unless they repeat an earlier row.

How the seed text reader counts lines (Spark's text source, i.e. Hadoop's LineReader):

- a line ends at "\\n", "\\r\\n" or a lone "\\r" (so a stray CR inside a line cuts it in two);
- a terminator at the end of the file does not start another line: "a\\n" and "a" are one
  line each, "a\\n\\n" is two (the second one blank and rejected), an empty file has none;
- a UTF-8 byte order mark at the very start of a file is dropped (it marks the encoding);
- the bytes are cut before they are decoded, so UTF-16 text is cut at its 0x0A bytes;
  ``raw`` is the line decoded as UTF-8, invalid bytes replaced by U+FFFD.

CSV tables go through Spark's CSV source, which cuts lines the same way (there are no
multi-line records: a quoted cell holding a line break makes two records), skips blank
lines (nothing but characters <= U+0020: Java's String.trim) and takes the first other
line of a file as its header; ``row`` counts the remaining lines (records) of the file.

Each example is a whole Spark prepare run (seconds), so the example counts are small;
``derandomize`` makes every run (and CI) draw the same examples.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import pandas as pd
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from adjoint_spark.prepare import run_prepare
from adjoint_spark.readers import PrepareError
from tests.test_prepare_seed import seed_config
from tests.test_prepare_tables import _config as csv_config

PROPERTY = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    # Shrinking reruns Spark jobs for many minutes; the failing example is printed as is.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

TERMINATORS = (b"\n", b"\r\n", b"\r")
UTF8_BOM = b"\xef\xbb\xbf"
# Reasons a valid row may still get: it repeats an earlier row, or a test label is a train pair.
REPEAT_REASONS = ("duplicate ", "pair is also a train label")
NUMBER_TOKENS = (
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "1e308",
    "-0",
    "-0.0",
    "１２",
    "٣",
    "½",
    "99999999999999999999",
    "9223372036854775808",
    "-9223372036854775809",
    "",
    " ",
    "1d",
    "0x1p3",
    "0x10",
    "1_000",
    "5.5",
    "+5",
    "--1",
    "1.2.3",
    "e",
    "\x005",
    "5\x00",
    "\xa05",
    "TRUE",
)
SEQUENCE_TOKENS = ("1,,2", ",", "1,a", "1;2", "-1", " 1 , 2 ", "1,2,", "[1,2]", "1、2", "1,nan")
BLANKS = (b"", b" ", b"   ", b"\t", b"\x1b", b" \t\x1b ", b"\x00", b"\x0b\x0c")
ENCODINGS = ("latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig")
NASTY_CHARS = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from("\x00\r\n\x1b\t,;\"'\\ #\x7f\x85\u2028\ufeff\ufffd"),
)
KEYS = st.integers(0, 12)
NUMBERS = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False).map(repr),
)


def physical_lines(data: bytes) -> list[bytes]:
    """The lines Spark reads from a file (see the module docstring)."""
    lines = re.split(rb"\r\n|\r|\n", data.removeprefix(UTF8_BOM))
    if lines[-1] == b"":
        lines.pop()
    return lines


def decoded(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")


def java_blank(text: str) -> bool:
    """Blank for Spark's CSV source: String.trim leaves nothing."""
    return all(ch <= " " for ch in text)


@dataclass
class InputFile:
    """The written lines of one file, each with its terminator and whether it is valid."""

    name: str
    pieces: list[tuple[bytes, bool]]

    @property
    def data(self) -> bytes:
        return b"".join(piece for piece, _ in self.pieces)

    def valid_lines(self) -> set[int]:
        """1-based physical line numbers of the valid rows."""
        found, prefix = set(), b""
        for piece, valid in self.pieces:
            if valid:
                found.add(len(physical_lines(prefix)) + 1)
            prefix += piece
        return found


def assemble(name: str, lines: list[tuple[bytes, bool]], ends: list[bytes]) -> InputFile:
    return InputFile(name, [(line + end, ok) for (line, ok), end in zip(lines, ends, strict=True)])


@st.composite
def input_file(draw, name, valid_lines, hostile, max_hostile=6, header=None):
    """Valid and hostile lines in random order, each ended by \\n, \\r\\n or \\r (or, the
    last one, nothing); a header (CSV) stays first."""
    lines = [(v, True) for v in valid_lines]
    lines += [(h, False) for h in draw(st.lists(hostile, max_size=max_hostile))]
    lines = list(draw(st.permutations(lines)))
    if header is not None:
        lines.insert(0, (header, False))
    ends = [draw(st.sampled_from(TERMINATORS)) for _ in lines]
    if ends:
        ends[-1] = draw(st.sampled_from((*TERMINATORS, b"")))
    return assemble(name, lines, ends)


# ---------------------------------------------------------------------------- seed text


@st.composite
def seed_line(draw, fields: list[str]) -> str:
    """Fields joined by tabs and ESC characters (the seed format's ``auto`` delimiter)."""
    seps = [draw(st.sampled_from(["\t", "\x1b"])) for _ in fields[1:]]
    return fields[0] + "".join(s + f for s, f in zip(seps, fields[1:], strict=True))


@st.composite
def query_fields(draw):
    cats = [str(draw(st.integers(0, 1))), str(draw(st.integers(2, 4)))]
    return [str(draw(KEYS)), draw(NUMBERS), draw(NUMBERS), *cats]


@st.composite
def item_fields(draw):
    seq = draw(st.lists(KEYS, min_size=1, max_size=4))
    return [str(draw(KEYS)), draw(NUMBERS), str(draw(st.integers(0, 2))), ",".join(map(str, seq))]


def label_fields(queries=KEYS, items=KEYS):
    return st.tuples(queries, items).map(lambda p: [str(p[0]), str(p[1])])


@st.composite
def mutated(draw, fields: list[str]) -> list[str]:
    """Fields with one replaced by a hostile number, sequence or short text."""
    fields = list(fields)
    i = draw(st.integers(0, len(fields) - 1))
    fields[i] = draw(
        st.one_of(
            st.sampled_from(NUMBER_TOKENS),
            st.sampled_from(SEQUENCE_TOKENS),
            st.text(NASTY_CHARS, max_size=5),
        )
    )
    return fields


@st.composite
def recounted(draw, fields: list[str]) -> list[str]:
    """Fields with some dropped or some added."""
    if draw(st.booleans()):
        keep = draw(
            st.lists(st.integers(0, len(fields) - 1), unique=True, max_size=len(fields) - 1)
        )
        return [fields[i] for i in sorted(keep)]
    return fields + draw(st.lists(st.sampled_from(NUMBER_TOKENS + ("7",)), min_size=1, max_size=3))


@st.composite
def hostile_seed_line(draw, fields_strategy) -> bytes:
    fields = draw(fields_strategy)
    kind = draw(st.sampled_from(["bytes", "text", "blank", "value", "count", "encoding", "junk"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "text":
        return draw(st.text(NASTY_CHARS, max_size=30)).encode("utf-8")
    if kind == "blank":
        return draw(st.sampled_from(BLANKS))
    if kind == "value":
        return draw(seed_line(draw(mutated(fields)))).encode("utf-8")
    if kind == "count":
        fields = draw(recounted(fields))
        return draw(seed_line(fields)).encode("utf-8") if fields else b""
    line = draw(seed_line(fields))
    if kind == "encoding":
        codec = draw(st.sampled_from(ENCODINGS))
        return (line + draw(st.sampled_from(["", "é", "\xa0", "€"]))).encode(codec, "replace")
    at = draw(st.integers(0, len(line)))
    junk = draw(
        st.sampled_from(["\x00", "\x1b", "\t", " ", "\r", "\x7f", "\x85", "\u2028", "\x01"])
    )
    return (line[:at] + junk + line[at:]).encode("utf-8")


@dataclass
class SeedCase:
    files: dict[str, InputFile]  # queries, items, labels, test_labels


@st.composite
def seed_cases(draw):
    queries = draw(st.lists(query_fields(), min_size=1, max_size=5))
    items = draw(st.lists(item_fields(), min_size=1, max_size=5))
    qkeys = sorted({int(q[0]) for q in queries})
    ikeys = sorted({int(i[0]) for i in items})
    pairs = st.tuples(st.sampled_from(qkeys), st.sampled_from(ikeys))
    train = draw(st.lists(pairs, min_size=1, max_size=6))
    others = [(q, i) for q in qkeys for i in ikeys if (q, i) not in set(train)]
    test = draw(st.lists(st.sampled_from(others), min_size=1, max_size=3)) if others else []
    tables = {
        "queries": ([draw(seed_line(f)) for f in queries], query_fields()),
        "items": ([draw(seed_line(f)) for f in items], item_fields()),
        "labels": ([draw(seed_line([str(q), str(i)])) for q, i in train], label_fields()),
        "test_labels": ([draw(seed_line([str(q), str(i)])) for q, i in test], label_fields()),
    }
    files = {}
    for name, (valid, fields) in tables.items():
        lines = [v.encode("utf-8") for v in valid]
        files[name] = draw(input_file(f"{name}.txt", lines, hostile_seed_line(fields)))
    return SeedCase(files)


def _kitchen_sink_seed_case() -> SeedCase:
    """Every kind of hostile line once, with every kind of line end."""

    def f(name, lines, ends):
        return assemble(name, [(line, ok) for line, ok in lines], ends)

    queries = [
        (b"0\t1.5\t2\t0\t2", True),
        ("1\t1\t2\t0\t3".encode("utf-16"), False),
        ("2\x1b1\x1b2\x1b1\x1bé".encode("latin-1"), False),
        (b"3\t\xff\xfe\x00\t2\t0\t2", False),
        (b"4\tnan\t1e999\t0\t2", False),
        ("５\t１２\t-0\t0\t2".encode(), False),
        (b"99999999999999999999\t1\t2\t0\t2", False),
        (b"", False),
        (b"6\t1\t2\t0\t2\t", False),
        (b"7\t1\t2\t0\t2", True),
        (b"\xef\xbb\xbf8\t1\t2\t0\t2", False),
    ]
    items = [
        (b"0\t0.5\t0\t1,2", True),
        (b"1\t0.5\t0\t1,,2", False),
        (b"2\t-0\t1\t1,a", False),
        (b"3\t1\t2\t", False),
        (b"4\t1\t2\t99999999999999999999", False),
        (b"5\t1\t2\t3\r7", False),
        (b"6\t1\t2\t7", True),
    ]
    labels = [(b"0\t0", True), (b"7\t6", True), (b"0\t0", False), (b"\x000\t6", False)]
    test_labels = [(b"7\t0", True), (b"0\t6\t1", False), (b" ", False)]
    return SeedCase(
        {
            "queries": f("queries.txt", queries, [b"\r\n", b"\n", b"\r"] * 3 + [b"\n", b"\n"]),
            "items": f("items.txt", items, [b"\n"] * 6 + [b""]),
            "labels": f("labels.txt", labels, [b"\r\n", b"\r", b"\n", b"\n\n"]),
            "test_labels": f("test_labels.txt", test_labels, [b"\r", b"\r\n", b""]),
        }
    )


# ---------------------------------------------------------------------------- CSV

CSV_TABLES = {  # the files and columns of tests/test_prepare_tables.py's config
    "queries": ("users.csv", ("user", "age", "city")),
    "items": ("products.csv", ("sku", "price", "brand", "bw")),
    "labels": ("orders.csv", ("user", "sku", "t")),
}
EXTRA_NAMES = ("note", "a`b", "x.y", " spaced ", "", "ü", "#", "1", 'say "hi"', "a,b")
SAFE_TEXT = st.text("abXZ09 ,;é中ß-_.", max_size=8)


def csv_text(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    return out.getvalue()


@st.composite
def csv_cells(draw, name: str, columns: list[str], qkeys=KEYS, ikeys=KEYS) -> list[str]:
    values = {
        "queries": lambda: {"user": str(draw(KEYS)), "age": draw(NUMBERS), "city": draw(SAFE_TEXT)},
        "items": lambda: {
            "sku": str(draw(KEYS)),
            "price": draw(NUMBERS),
            "brand": draw(SAFE_TEXT),
            "bw": ",".join(map(str, draw(st.lists(KEYS, min_size=1, max_size=3)))),
        },
        "labels": lambda: {
            "user": str(draw(qkeys)),
            "sku": str(draw(ikeys)),
            "t": str(draw(st.integers(0, 10**12))),
        },
    }[name]()
    return [values[c] if c in values else draw(SAFE_TEXT) for c in columns]


@st.composite
def hostile_csv_line(draw, cells_strategy) -> bytes:
    cells = draw(cells_strategy)
    kind = draw(
        st.sampled_from(["bytes", "text", "blank", "value", "count", "quote", "break", "encoding"])
    )
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "text":
        return draw(st.text(NASTY_CHARS, max_size=30)).encode("utf-8")
    if kind == "blank":
        return draw(st.sampled_from(BLANKS))
    if kind == "value":
        cells = draw(mutated(cells))
    elif kind == "count":
        cells = draw(recounted(cells))
    elif kind == "quote":
        i = draw(st.integers(0, len(cells) - 1))
        cells[i] = draw(st.sampled_from(['"', '"x', 'x"', '""', '"a""b"', "\\", '\\"', '"1,2"']))
    elif kind == "break":
        i = draw(st.integers(0, len(cells) - 1))
        cells[i] = '"' + cells[i] + draw(st.sampled_from(["\n", "\r\n", "\r"])) + 'x"'
    line = ",".join(cells)
    if kind == "encoding":
        codec = draw(st.sampled_from(ENCODINGS))
        return (line + draw(st.sampled_from(["", "é", "€"]))).encode(codec, "replace")
    return line.encode("utf-8")


@dataclass
class CsvCase:
    files: dict[str, InputFile]  # queries, items, labels; the first line is the header
    widths: dict[str, int]


@st.composite
def csv_cases(draw):
    extras = draw(st.lists(st.sampled_from(EXTRA_NAMES), unique=True, max_size=2))
    headers = {}
    for name, (_, columns) in CSV_TABLES.items():
        headers[name] = list(draw(st.permutations([*columns, *extras])))
    valid = {}
    for name in ("queries", "items"):
        valid[name] = draw(st.lists(csv_cells(name, headers[name]), min_size=1, max_size=5))
    keys = {}
    for name, key in (("queries", "user"), ("items", "sku")):
        keys[name] = sorted({int(row[headers[name].index(key)]) for row in valid[name]})
    labels = csv_cells("labels", headers["labels"], *[st.sampled_from(keys[n]) for n in keys])
    valid["labels"] = draw(st.lists(labels, min_size=1, max_size=6))
    files = {}
    for name, (file, _) in CSV_TABLES.items():
        lines = [csv_text(row).encode("utf-8") for row in valid[name]]
        hostile = hostile_csv_line(csv_cells(name, headers[name]))
        header = csv_text(headers[name]).encode("utf-8")
        files[name] = draw(input_file(file, lines, hostile, header=header))
    return CsvCase(files, {name: len(h) for name, h in headers.items()})


def _hostile_header_csv_case() -> CsvCase:
    """A header with a backtick in a column name, a record wider than Univocity's default
    limit of 20480 columns, a quoted line break, missing and extra cells, blank lines."""

    def f(name, header, lines):
        rows = [(header, False), *lines]
        return assemble(name, rows, [b"\n"] * len(rows))

    users = [
        (b"1,20,a,x", True),
        (b"," * 20500, False),
        (b'2,"3\r\n4",b,y', False),
        (b"3,30", False),
        (b"4,40,c,d,extra", False),
        (b"   ", False),
        (b"5,1e999,x,z", False),
        (b'6,7,"a,b",', True),
    ]
    products = [(b'100,1.0,x,"1,100"', True), (b"101,2,y,100,extra", False), (b"\x00", False)]
    orders = [(b"1,100,5", True), (b"6,100", False), (b"1,100,5", False), (b"6,100,x", False)]
    return CsvCase(
        {
            "queries": f("users.csv", b"user,age,city,n`ote", users),
            "items": f("products.csv", b"sku,price,brand,bw", products),
            "labels": f("orders.csv", b"t,sku,user", orders),
        },
        {"queries": 4, "items": 4, "labels": 3},
    )


# ---------------------------------------------------------------------------- checks


def run(spark, files: dict[str, InputFile], make_config):
    """Write the files into a fresh folder and run prepare: (result, rejects) when it
    succeeds, (None, the PrepareError) when it stops."""
    folder = tempfile.mkdtemp(prefix="hostile-")
    try:
        for f in files.values():
            with open(os.path.join(folder, f.name), "wb") as fh:
                fh.write(f.data)
        try:
            result = run_prepare(spark, make_config(folder))
        except PrepareError as err:
            return None, err
        rejects = pd.read_parquet(os.path.join(result.path, "rejects"))
        return result, rejects
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_fatal(err: PrepareError, expected_read: dict[str, int]) -> None:
    """A fatal error names its table and says why; "no rows" only for an empty table."""
    message = str(err)
    table = message.split(":", 1)[0]
    assert table in expected_read and len(message) > len(table) + 2, message
    if "has no rows" in message:
        assert expected_read[table] == 0, message


def check_accounting(result, rejects: pd.DataFrame, expected_read: dict[str, int]) -> dict:
    """Counts add up and every reject is one row of its table, with a reason; returns the
    rejects of each table as {row: (raw, reason)}."""
    tables = result.manifest["tables"]
    assert set(tables) == set(expected_read)
    for name, t in tables.items():
        assert t["read"] == t["accepted"] + t["rejected"], (name, t)
        assert t["read"] == expected_read[name], (name, t, expected_read)
    assert len(rejects) == sum(t["rejected"] for t in tables.values())
    assert set(rejects["table"]) <= set(tables)
    by_table = {}
    for name, t in tables.items():
        got = rejects[rejects["table"] == name]
        rows = [int(r) for r in got["row"]]
        assert len(rows) == t["rejected"] and len(set(rows)) == len(rows), (name, rows)
        assert all(1 <= r <= t["read"] for r in rows), (name, rows, t)
        assert all(isinstance(r, str) and r.strip() for r in got["reason"]), got
        assert all(isinstance(r, str) for r in got["raw"]), got
        by_table[name] = dict(zip(rows, zip(got["raw"], got["reason"], strict=True), strict=True))
    return by_table


def check_valid_rows_kept(name, valid_rows, rejected) -> None:
    for row in valid_rows:
        if row in rejected:
            assert rejected[row][1].startswith(REPEAT_REASONS), (name, row, rejected[row])


def check_seed(spark, case: SeedCase) -> None:
    lines = {name: physical_lines(f.data) for name, f in case.files.items()}
    expected_read = {name: len(v) for name, v in lines.items()}
    widths = {"queries": 5, "items": 4, "labels": 2, "test_labels": 2}

    def config(folder):
        paths = {name: os.path.join(folder, f.name) for name, f in case.files.items()}
        return seed_config(paths, os.path.join(folder, "out"))

    result, got = run(spark, case.files, config)
    if result is None:
        check_fatal(got, expected_read)
        return
    by_table = check_accounting(result, got, expected_read)
    for name, rejected in by_table.items():
        for row, line in enumerate(lines[name], 1):
            text = decoded(line)
            if text.strip(" ") == "" or len(re.split("[\t\x1b]", text)) != widths[name]:
                assert row in rejected, (name, row, text)
            if row in rejected:
                assert rejected[row][0] == text, (name, row, rejected[row], text)
        check_valid_rows_kept(name, case.files[name].valid_lines(), rejected)


def check_csv(spark, case: CsvCase) -> None:
    records, valid_records = {}, {}
    for name, f in case.files.items():
        # Records: the non-blank lines after the first (the header); their physical lines.
        numbered = [n for n, line in enumerate(physical_lines(f.data), 1)]
        texts = {n: decoded(line) for n, line in zip(numbered, physical_lines(f.data), strict=True)}
        kept = [n for n in numbered if not java_blank(texts[n])][1:]
        records[name] = [texts[n] for n in kept]
        valid = f.valid_lines()
        valid_records[name] = {i for i, n in enumerate(kept, 1) if n in valid}
    expected_read = {name: len(r) for name, r in records.items()}

    def config(folder):
        return csv_config(folder, "csv", os.path.join(folder, "out"))

    result, got = run(spark, case.files, config)
    if result is None:
        check_fatal(got, expected_read)
        return
    by_table = check_accounting(result, got, expected_read)
    for name, rejected in by_table.items():
        width = case.widths[name]
        for row, text in enumerate(records[name], 1):
            plain = '"' not in text and "\\" not in text
            if plain and text.count(",") + 1 != width:
                assert row in rejected, (name, row, text)
            if row in rejected:
                raw = rejected[row][0]
                assert raw == text or isinstance(json.loads(raw), dict), (name, row, raw, text)
        check_valid_rows_kept(name, valid_records[name], rejected)


# ---------------------------------------------------------------------------- tests


@PROPERTY
@given(case=seed_cases())
@example(case=_kitchen_sink_seed_case())
def test_seed_text_reader_accounts_for_every_line(spark, case):
    check_seed(spark, case)


@PROPERTY
@given(case=csv_cases())
@example(case=_hostile_header_csv_case())
def test_csv_reader_accounts_for_every_record(spark, case):
    check_csv(spark, case)
