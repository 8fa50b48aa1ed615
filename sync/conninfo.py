"""libpq's connection strings, parsed by libpq's own rules without loading a driver.

Both forms a user pastes: ``postgresql://user:password@host:port,host2/dbname?key=value`` (or
``postgres://``), percent-decoded where libpq decodes, and ``key=value`` pairs separated by blanks, a value
quoted with ``'`` when it holds blanks and ``\\`` escaping the next character. Only the settings the string
names are returned; keywords libpq does not know are refused, as libpq refuses them. ``ssl=true`` in a URL's
query and ``requiressl`` are libpq's old spellings of ``sslmode``.
"""

from __future__ import annotations

KEYWORDS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_issuer",
        "oauth_scope",
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",
        "requirepeer",
        "scram_client_key",
        "scram_server_key",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslkeylogfile",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
"""The connection settings of libpq 18 (those of older releases are among them)."""

URI_PREFIXES = ("postgresql://", "postgres://")
_BLANKS = " \t\n\v\f\r"
_HEX = "0123456789abcdefABCDEF"


class ConninfoError(ValueError):
    """A connection string libpq would refuse; the message quotes the offending token."""


def parse_conninfo(text: str) -> dict[str, str]:
    """The settings ``text`` names, by libpq's rules; :class:`ConninfoError` where libpq fails."""
    settings: dict[str, str] = {}
    for prefix in URI_PREFIXES:
        if text.startswith(prefix):
            _parse_uri(text[len(prefix) :], settings)
            return settings
    _parse_pairs(text, settings)
    return settings


def _store(settings: dict[str, str], keyword: str, value: str) -> None:
    if keyword == "requiressl":
        keyword, value = "sslmode", "require" if value.startswith("1") else "prefer"
    if keyword not in KEYWORDS:
        raise ConninfoError(f'invalid connection option "{keyword}"')
    settings[keyword] = value


def _parse_pairs(text: str, settings: dict[str, str]) -> None:
    """``key=value`` pairs: blanks around ``=`` allowed, ``'quoted values'``, ``\\`` escapes."""
    at, end = 0, len(text)
    while at < end:
        if text[at] in _BLANKS:
            at += 1
            continue
        start = at
        while at < end and text[at] != "=" and text[at] not in _BLANKS:
            at += 1
        keyword = text[start:at]
        while at < end and text[at] in _BLANKS:
            at += 1
        if at == end or text[at] != "=":
            raise ConninfoError(f'missing "=" after "{keyword}" in connection info string')
        at += 1
        while at < end and text[at] in _BLANKS:
            at += 1
        value: list[str] = []
        if at < end and text[at] == "'":
            at += 1
            while True:
                if at == end:
                    raise ConninfoError("unterminated quoted string in connection info string")
                char = text[at]
                if char == "'":
                    at += 1
                    break
                if char == "\\":
                    at += 1
                    if at == end:
                        continue
                value.append(text[at])
                at += 1
        else:
            while at < end and text[at] not in _BLANKS:
                if text[at] == "\\":
                    at += 1
                    if at == end:
                        break
                value.append(text[at])
                at += 1
        _store(settings, keyword, "".join(value))


def _parse_uri(rest: str, settings: dict[str, str]) -> None:
    """What follows ``postgresql://``: ``[user[:password]@][host][:port][,...][/dbname][?key=value&...]``."""
    at = 0
    credentials = _scan(rest, 0, "@/")
    if credentials < len(rest) and rest[credentials] == "@":
        user_end = _scan(rest, 0, ":@")
        if user_end:
            settings["user"] = _decode(rest[:user_end])
        if rest[user_end] == ":":
            password = rest[user_end + 1 : credentials]
            if password:
                settings["password"] = _decode(password)
        at = credentials + 1
    hosts: list[str] = []
    ports: list[str] = []
    ended_by = ""
    while True:
        if at < len(rest) and rest[at] == "[":
            close = rest.find("]", at + 1)
            if close < 0:
                raise ConninfoError(
                    'end of string reached when looking for matching "]" in IPv6 host address'
                )
            if close == at + 1:
                raise ConninfoError("IPv6 host address may not be empty in URI")
            hosts.append(rest[at + 1 : close])
            at = close + 1
            if at < len(rest) and rest[at] not in ":/?,":
                raise ConninfoError(f'unexpected character "{rest[at]}" after an IPv6 host address in URI')
        else:
            host_end = _scan(rest, at, ":/?,")
            hosts.append(rest[at:host_end])
            at = host_end
        ended_by = rest[at] if at < len(rest) else ""
        if ended_by == ":":
            port_end = _scan(rest, at + 1, "/?,")
            ports.append(rest[at + 1 : port_end])
            at = port_end
            ended_by = rest[at] if at < len(rest) else ""
        else:
            ports.append("")
        if ended_by != ",":
            break
        at += 1
    for keyword, values in (("host", hosts), ("port", ports)):
        if joined := ",".join(values):
            settings[keyword] = _decode(joined)
    if ended_by == "/":
        db_end = _scan(rest, at + 1, "?")
        if db_end > at + 1:
            settings["dbname"] = _decode(rest[at + 1 : db_end])
        at = db_end
        ended_by = rest[at] if at < len(rest) else ""
    if ended_by == "?":
        _parse_query(rest[at + 1 :], settings)


def _parse_query(query: str, settings: dict[str, str]) -> None:
    pairs = query.split("&")
    if pairs[-1] == "":
        pairs.pop()  # one "&" may end the query
    for pair in pairs:
        keyword, sep, value = pair.partition("=")
        if not sep:
            raise ConninfoError(f'missing key/value separator "=" in URI query parameter: "{pair}"')
        if "=" in value:
            raise ConninfoError(f'extra key/value separator "=" in URI query parameter: "{keyword}"')
        keyword, value = _decode(keyword), _decode(value)
        if keyword == "ssl" and value == "true":
            keyword, value = "sslmode", "require"
        try:
            _store(settings, keyword, value)
        except ConninfoError:
            raise ConninfoError(f'invalid URI query parameter: "{keyword}"') from None


def _scan(text: str, at: int, stops: str) -> int:
    """The index of the first of ``stops`` in ``text`` from ``at`` (its length when there is none)."""
    while at < len(text) and text[at] not in stops:
        at += 1
    return at


def _decode(token: str) -> str:
    """``%XX`` escapes decoded (``+`` is not a blank here; ``%00`` is refused), as UTF-8; spaces around
    the token are dropped, a space inside it is refused (it must be written ``%20``)."""
    token = token.strip(" ")
    if " " in token:
        raise ConninfoError(f'unexpected spaces found in "{token}", use percent-encoded spaces (%20) instead')
    if "%" not in token:
        return token
    out = bytearray()
    at = 0
    while at < len(token):
        char = token[at]
        if char != "%":
            out += char.encode()
            at += 1
            continue
        digits = token[at + 1 : at + 3]
        if len(digits) < 2 or digits[0] not in _HEX or digits[1] not in _HEX:
            raise ConninfoError(f'invalid percent-encoded token: "{token}"')
        if digits == "00":
            raise ConninfoError(f'forbidden value %00 in percent-encoded value: "{token}"')
        out.append(int(digits, 16))
        at += 3
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ConninfoError(f'invalid percent-encoded token: "{token}"') from None
