"""Every diagnostic code regdsl emits, with its severity and a one-line summary.

Codes are stable: a code is never reused for another problem. docs/diagnostics.md
explains each one with an example and a fix; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Severity = Literal["error", "warning"]


class Code(NamedTuple):
    severity: Severity
    summary: str


CODES: dict[str, Code] = {
    # The file itself: syntax and values (no model needed).
    "RD001": Code("error", "syntax error"),
    "RD002": Code("error", "the file is not valid UTF-8"),
    "RD003": Code("error", "a number literal overflows to infinity or underflows to 0"),
    "RD004": Code("error", "a strength (or a max_norm, lr_mult value) is negative, NaN or infinite; max_norm is 0"),
    "RD005": Code("error", "an invalid name pattern"),
    "RD006": Code("error", "a term appears twice in one rule"),
    "RD007": Code("error", "an invalid schedule or dim (not a whole number, out of range, repeated, until before from or before the warmup ends)"),
    "RD008": Code("error", "a selector atom that cannot select what a term acts on ('bias' with an activity term)"),
    "RD009": Code("error", "an invalid spec (JSON input)"),
    "RD010": Code("error", "an invalid search space (bounds, a value listed twice, a name defined twice or never, or a keyword or number word)"),
    "RD011": Code("error", "a search space without a value, at compile"),
    "RD012": Code("error", "a capture ('{i}') outside a rule whose depth names it, or a depth naming a capture its selector lacks"),
    "RD013": Code("error", "an invalid depth or lr_decay: not a whole number >= 0 / not in (0, 1], a second lr_decay, one without the other"),
    "RD014": Code("error", "formatting would rename an unnamed search space (named by its line)"),
    # Against a model: rules that cannot do what they say.
    "RD101": Code("error", "a selector, or one pattern in it, matches no parameter"),
    "RD102": Code("error", "a type name matches no module class in the model"),
    "RD104": Code("error", "a term that cannot take effect on a parameter"),
    "RD105": Code("error", "a reference for 'l2 ... to ref' is missing, lacks a parameter, or has the wrong shape"),
    "RD106": Code("error", "an activity term on a module whose output is not a floating-point tensor"),
    "RD107": Code("error", "the model has nothing to train: no parameters, or all frozen"),
    "RD108": Code("error", "a depth expression gives a parameter a depth below 0 or above 2**63 - 1"),
    # Against a model: probably mistakes (errors under --strict; RegDslWarning from compile()).
    # RD103 was an error before compile() enforced diagnostics; a default followed by
    # overrides ("all l2 1e-4" then "type Linear l2 1e-3") is the usual way to write a file,
    # and on a model where the override reaches everything the default is dead, not wrong.
    "RD103": Code("warning", "a dead rule: later lines override its every effect"),
    "RD201": Code("warning", "an exclude matches nothing"),
    "RD202": Code("warning", "a rule matches only frozen parameters"),
    "RD203": Code("warning", "the aliases of a tied parameter are matched by different rules"),
    "RD204": Code("warning", "decay and l2 on the same parameter"),
    "RD205": Code("warning", "an activity term on a module its parent never calls"),
    "RD206": Code("warning", "a trainable parameter that no depth rule selects, in a file with lr_decay"),
}


def severity(code: str) -> Severity:
    return CODES[code].severity
