"""The one SQL lexer: tells code from comments, string literals, quoted identifiers and dollar quotes.

Used by the metric checks (`reaper check`: one query, nothing that writes) and by the pgwatch importer
(pgwatch's queries end with ';' and use `--` comments, which reaper's combined statement cannot hold).
It knows PostgreSQL's lexical rules that matter for that: nested /* */ comments, '' and E'\\'' escapes,
"" inside quoted identifiers, $tag$ quotes (and `$1` parameters, which are not quotes).
"""

from __future__ import annotations

import re

import attrs

# Token kinds: whitespace, /* */ comment, -- comment, 'string', "quoted identifier", $$dollar quote$$,
# a statement separator, and everything else (keywords, names, operators, numbers).
WS, COMMENT, LINE, STRING, QUOTED, DOLLAR, SEMICOLON, OTHER = (
    "ws", "comment", "line", "string", "quoted", "dollar", ";", "other")
LITERALS = frozenset({STRING, QUOTED, DOLLAR})

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


@attrs.frozen
class Lexed:
    tokens: tuple[tuple[str, str], ...]  # (kind, text); the texts joined give back the input
    problems: tuple[str, ...]  # unterminated comments, literals, identifiers or dollar quotes


def lex(sql: str) -> Lexed:
    """Split SQL into (kind, text) tokens."""
    tokens: list[tuple[str, str]] = []
    problems: list[str] = []
    i, n = 0, len(sql)
    other_start = -1

    def flush(end: int) -> None:
        nonlocal other_start
        if other_start >= 0:
            tokens.append((OTHER, sql[other_start:end]))
            other_start = -1

    while i < n:
        c = sql[i]
        start = i
        if c.isspace():
            while i < n and sql[i].isspace():
                i += 1
            kind = WS
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            kind = LINE
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                problems.append("unterminated /* comment")
            kind = COMMENT
        elif c == "'":
            escapes = start > 0 and sql[start - 1] in "eE" and (
                start < 2 or not (sql[start - 2].isalnum() or sql[start - 2] == "_"))
            i, closed = _close_quote(sql, i + 1, "'", escapes)
            if not closed:
                problems.append("unterminated string literal")
            kind = STRING
        elif c == '"':
            i, closed = _close_quote(sql, i + 1, '"', False)
            if not closed:
                problems.append("unterminated quoted identifier")
            kind = QUOTED
        elif c == "$" and not (start > 0 and (sql[start - 1].isalnum() or sql[start - 1] in "_$")) and (
                m := _DOLLAR_TAG.match(sql, i)):
            tag = m.group(0)
            end = sql.find(tag, m.end())
            if end < 0:
                problems.append(f"unterminated {tag} quote")
                i = n
            else:
                i = end + len(tag)
            kind = DOLLAR
        elif c == ";":
            i += 1
            kind = SEMICOLON
        else:
            if other_start < 0:
                other_start = i
            i += 1
            continue
        flush(start)
        tokens.append((kind, sql[start:i]))
    flush(n)
    return Lexed(tokens=tuple(tokens), problems=tuple(problems))


def _close_quote(sql: str, i: int, quote: str, backslash_escapes: bool) -> tuple[int, bool]:
    """Index just past the closing quote (a doubled quote is part of the text), and whether it closed."""
    n = len(sql)
    while i < n:
        if backslash_escapes and sql[i] == "\\":
            i += 2
        elif sql[i] == quote:
            if sql.startswith(quote * 2, i):
                i += 2
            else:
                return i + 1, True
        else:
            i += 1
    return n, False


@attrs.frozen
class Code:
    """SQL with only its code left: what checks for words and function calls may look at."""

    text: str  # comments -> " ", strings and dollar quotes -> '', quoted identifiers -> ""
    names: str  # the same, but quoted identifiers replaced by their name (for function calls)
    line_comments: int  # `--` comments seen
    problems: tuple[str, ...]


def code_of(sql: str) -> Code:
    lexed = lex(sql)
    text: list[str] = []
    names: list[str] = []
    line_comments = 0
    for kind, token in lexed.tokens:
        if kind in (COMMENT, LINE):
            line_comments += kind == LINE
            text.append(" ")
            names.append(" ")
        elif kind in (STRING, DOLLAR):
            text.append("''")
            names.append("''")
        elif kind == QUOTED:
            text.append('""')
            names.append(" " + token[1:-1].replace('""', '"') + " ")
        else:
            text.append(token)
            names.append(token)
    return Code(text="".join(text), names="".join(names), line_comments=line_comments,
                problems=lexed.problems)


def first_word(sql: str) -> str:
    """The first keyword of the statement, lower case ('' when there is none)."""
    for kind, token in lex(sql).tokens:
        if kind == OTHER:
            m = re.match(r"[A-Za-z_]+", token)
            return m.group(0).lower() if m else ""
        if kind not in (WS, COMMENT, LINE):
            return ""
    return ""


@attrs.frozen
class CleanSQL:
    text: str
    empty: bool  # nothing but comments, whitespace and semicolons
    semicolons: int  # trailing semicolons removed
    line_comments: int  # -- comments turned into /* */
    statements: int  # statements left (more than 1 is not one query)
    first_word: str


def clean_sql(sql: str) -> CleanSQL:
    """Made embeddable: trailing semicolons removed, -- comments turned into /* */, whitespace stripped."""
    tokens = lex(sql).tokens
    significant = [i for i, (kind, _) in enumerate(tokens) if kind in LITERALS or kind in (SEMICOLON, OTHER)]
    trailing: set[int] = set()
    for i in reversed(significant):
        if tokens[i][0] != SEMICOLON:
            break
        trailing.add(i)
    out: list[str] = []
    line_comments = 0
    for i, (kind, text) in enumerate(tokens):
        if i in trailing:
            continue
        if kind == LINE:
            body = text[2:].strip().replace("*/", "* /").replace("/*", "/ *")
            out.append(f"/* {body} */" if body else "")
            line_comments += 1
        else:
            out.append(text)
    rest = [tokens[i] for i in significant if i not in trailing]
    return CleanSQL(text="".join(out).strip(), empty=not rest, semicolons=len(trailing),
                    line_comments=line_comments, statements=1 + sum(1 for kind, _ in rest if kind == SEMICOLON),
                    first_word=first_word(sql))


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'
