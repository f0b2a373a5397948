"""Offline check of a PostgreSQL regular expression (an ARE: Advanced Regular Expression, what `~` takes).

A discovery source's `include_pattern` / `exclude_pattern` is matched by the server (`datname ~ pattern`). A
typo there (`^app_(prod`) was found only when the daemon listed the databases: `reaper check` said ok, a start
collected nothing, a reload was applied and its discovery failed. PostgreSQL's engine is not Python's (`\\m`,
`\\y`, `[[:alpha:]]`, `***=` and embedded options are its own), so `re.compile` cannot judge a pattern. This
scanner follows the ARE grammar only as far as the errors users make, and stays silent where it is not sure:
it never refuses what the server would accept (tests/test_regex_pg.py compares it with PostgreSQL on
thousands of random patterns). It finds unbalanced parentheses, brackets and bounds, a quantifier with
nothing before it, a bound out of range, a `(?` group the server does not know (Python's `(?P<name>`), and a
trailing backslash.
"""

from __future__ import annotations

DUPMAX = 255  # the largest count of a bound `{m,n}` (PostgreSQL's DUPMAX)
QUANTIFIERS = "*+?"


def are_problem(pattern: str) -> str | None:
    """What makes `pattern` an invalid ARE, in words, or None (valid, or nothing this scanner is sure of)."""
    text = pattern
    if text.startswith("***="):  # the rest is a literal string
        return None
    if text.startswith("***:"):
        text = text[4:]
    if text.startswith("(?") and not text.startswith("(?#"):  # embedded options, first thing only: (?i) ...
        end = text.find(")")
        if end < 0:
            return "an embedded option group `(?...` with no `)`"
        options = text[2:end]
        if options and options.isalpha():
            if set(options) & set("bcqex"):  # another syntax (basic, extended, literal) or whitespace rules:
                return None  # not judged here
            text = text[end + 1:]
    return _scan(text)


def _scan(text: str) -> str | None:
    depth: list[int] = []  # positions of open parentheses
    operand = False  # something a quantifier can apply to comes just before
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                return "it ends with a lone backslash"
            # a letter or digit escape (\d, \m, \y, \1) is an atom or a constraint: a constraint takes no quantifier,
            # but which is which is the server's to say here: treat both as an operand (silent either way)
            operand, i = True, i + (3 if text[i + 1] == "c" else 2)  # (\cX: the control character of X, any X)
            continue
        if c == "[":
            end = _bracket_end(text, i)
            if end is None:
                return f"the bracket expression at position {i + 1} has no closing `]`"
            operand, i = True, end + 1
            continue
        if c == "(":
            if text.startswith("(?", i):
                rest = text[i + 2:]
                if rest.startswith("#"):  # a comment (to the end when it has no `)`)
                    close = text.find(")", i)
                    if close < 0:
                        break
                    i = close + 1
                    continue
                head = next((h for h in (":", "=", "!", "<=", "<!") if rest.startswith(h)), None)
                if head is None:
                    return (f"`(?{rest[:1]}` at position {i + 1} is not PostgreSQL syntax (it knows `(?:`, `(?=`, "
                            "`(?!`, `(?<=`, `(?<!`; Python's named groups `(?P<name>...)` are not)")
                depth.append(i)
                operand, i = False, i + 2 + len(head)
                continue
            depth.append(i)
            operand, i = False, i + 1
            continue
        if c == ")":
            if not depth:
                return f"the `)` at position {i + 1} closes no `(`"
            depth.pop()
            operand, i = True, i + 1
            continue
        if c == "|":
            operand, i = False, i + 1
            continue
        if c in QUANTIFIERS or (c == "{" and i + 1 < n and text[i + 1].isdigit()):
            if not operand:
                return f"the quantifier `{c}` at position {i + 1} has nothing before it to repeat"
            if c == "{":
                end, problem = _bound_end(text, i)
                if problem is not None:
                    return problem
                i = end + 1
            else:
                i += 1
            if i < n and text[i] == "?":  # non-greedy
                i += 1
            operand = False  # a quantifier right after this one is an error (`a**`)
            continue
        if c in "^$":
            operand, i = False, i + 1  # an anchor: nothing to repeat
            continue
        operand, i = True, i + 1
    if depth:
        return f"the `(` at position {depth[-1] + 1} is never closed"
    return None


def _bracket_end(text: str, start: int) -> int | None:
    """The index of the `]` that closes the bracket expression opening at `start`, or None."""
    i, n = start + 1, len(text)
    if i < n and text[i] == "^":
        i += 1
    if i < n and text[i] == "]":  # a `]` first is a member
        i += 1
    while i < n:
        c = text[i]
        if c == "\\":  # (an ARE's brackets take escapes; \cX: the control character of X, any X)
            i += 3 if text[i + 1:i + 2] == "c" else 2
            continue
        if c == "[" and i + 1 < n and text[i + 1] in ":.=":  # [:alpha:], [.x.], [=x=]
            close = text.find(text[i + 1] + "]", i + 2)
            if close < 0:
                return None
            i = close + 2
            continue
        if c == "]":
            return i
        i += 1
    return None


def _bound_end(text: str, start: int) -> tuple[int, str | None]:
    """The index of the `}` closing the bound `{m}`, `{m,}` or `{m,n}` opening at `start`, and what is wrong."""
    close = text.find("}", start)
    if close < 0:
        return start, f"the bound `{{` at position {start + 1} has no closing `}}`"
    body = text[start + 1:close]
    low, comma, high = body.partition(",")
    if not low.isdigit() or (high and not high.isdigit()):
        return start, f"the bound `{{{body}}}` at position {start + 1} is not {{m}}, {{m,}} or {{m,n}}"
    if int(low) > DUPMAX or (high and int(high) > DUPMAX):
        return start, f"the bound `{{{body}}}` at position {start + 1} counts past {DUPMAX}, PostgreSQL's limit"
    if comma and high and int(low) > int(high):
        return start, f"the bound `{{{body}}}` at position {start + 1} has its smaller count last"
    return close, None
