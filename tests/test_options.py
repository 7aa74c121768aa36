"""Each option is declared once (tsam_fast/options.py), and what is derived from it agrees with it: the
constructor's signature and validation, StepConfig's fields, the docstring, the README's table, the test
tables and the table of bad arguments."""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest
import torch

from tables import SAMPLERS, VARIANTS
from test_errors import BAD_ARGS
from tsam_fast import TSAM, options
from tsam_fast.engine import StepConfig

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# options whose check accepts every value (flags are bool(value); a process group is the user's object)
ACCEPTS_ANYTHING = {"adaptive", "shared_ascent", "check_finite", "process_group"}


def test_the_signature_is_the_table():
    """TSAM.__init__'s keyword-only arguments are exactly the table's options, with the table's defaults
    (kept explicit for IDEs and type checkers; this test is what keeps them in step)."""
    params = inspect.signature(TSAM.__init__).parameters
    keywords = {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert list(keywords) == sorted(keywords, key=list(keywords).index)  # (order is the signature's own)
    assert set(keywords) == set(options.names()), "add the option to the table (or the table's to the signature)"
    for o in options.OPTIONS:
        assert keywords[o.name] == o.default, f"{o.name}: signature default {keywords[o.name]!r}, table {o.default!r}"


def test_step_config_fields_are_the_step_options():
    assert [f.name for f in dataclasses.fields(StepConfig)] == [o.name for o in options.by_scope("step")]
    assert StepConfig() == StepConfig(**{o.name: o.default for o in options.by_scope("step")})


def test_every_option_is_documented_and_listed():
    doc = TSAM.__doc__
    readme = open(README, encoding="utf-8").read()
    for o in options.OPTIONS:
        assert f"{o.name}: {o.doc[:30]}" in " ".join(doc.split()), f"{o.name} is missing from TSAM's docstring"
        if o.readme:
            assert f"| `{o.name}` |" in readme, f"{o.name} is missing from the README's options table"


def test_the_readme_table_is_generated_from_the_table():
    text = open(README, encoding="utf-8").read()
    assert options.with_table(text) == text, "the README's options table is stale: python scripts/options_table.py"


def test_every_option_that_can_be_wrong_has_a_bad_argument_row():
    """tests/test_errors.py's BAD_ARGS rejects a value of every option that can reject one."""
    covered = {name for kwargs, _, _ in BAD_ARGS for name in kwargs}
    missing = {o.name for o in options.OPTIONS} - ACCEPTS_ANYTHING - covered
    assert not missing, f"add a row to BAD_ARGS for {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(ACCEPTS_ANYTHING))
def test_options_without_a_bad_value_accept_anything(name):
    check = options.option(name).check
    for value in (0, 1, "x", None, 2.5):
        check(name, value)  # raises nothing


def test_the_test_tables_use_valid_options():
    for label, table in (("SAMPLERS", SAMPLERS), ("VARIANTS", VARIANTS)):
        for key, kwargs in table.items():
            unknown = set(kwargs) - set(options.names())
            assert not unknown, f"tests/tables.py {label}[{key!r}] names unknown options {unknown}"
            options.validate(dict(SAMPLERS["ascent"], **kwargs))


def test_a_plain_construction_and_the_options_read_back():
    p = torch.nn.Parameter(torch.randn(3))
    opt = TSAM([p], torch.optim.SGD, tilt=2.0, num_samples=4, lr=0.1)
    assert (opt.num_samples, opt.sampler, opt.tilt_every) == (4, "ascent", 1)
    assert opt.param_groups[0]["tilt"] == 2.0 and opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(AttributeError):
        opt.num_samples = 2  # the step options are fixed at construction
