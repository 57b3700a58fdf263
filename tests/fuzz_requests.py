"""Seeded malformed and mutated raw HTTP/1.1 requests for the wire fuzz test (tests/test_fuzz_wire.py).

Each case is the bytes to send and what the generator knows about them: how many answers are owed, whether
any answer must be a 4xx, and which blocks it may leave behind. Case `index` of `seed` depends on nothing
else, so a failing case is rebuilt alone with `Generator(profile).case(seed, index)`.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Sizes far from the daemon's limits (8 KiB request line, 16 KiB or 99 fields of header section, 64 KiB of
# ignored body, 64 bytes a bulk item), so the verdicts stay right when a limit moves a little.
HUGE_TARGET = (12_000, 40_000)
HUGE_FIELD = (20_000, 40_000)
HUGE_FIELD_COUNT = (150, 400)
HUGE_LENGTH = 5_000_000  # declared, never sent

# Every valid-looking target of a block comes from 198.18.0.0/15, 203.0.113.0/24 and 2001:db8::/32.
# Each case owns 8 addresses of 198.18.0.0/15 (below 198.19.255.0/24, which the test puts in never_block)
# and the /80 2001:db8:1:<hi>:<lo>::, so any block left in the kernel can be traced to the case that made it.
SLOT4_BASE = int(ipaddress.IPv4Address("198.18.0.0"))
SLOT4_COUNT = 16_352
ALLOWED = [ipaddress.ip_network(n) for n in ("198.18.0.0/15", "203.0.113.0/24", "2001:db8::/32")]
SHARED = ["203.0.113.0/24", "203.0.113.128/25", "203.0.113.255", "203.0.113.0", "203.0.113.1", "198.18.0.0/16",
          "2001:db8::/33", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::", "2001:db8:2::/48",
          "2001:0db8:0002:0000:0000:0000:0000:0001", "2001:DB8:2::A"]
# Never a valid network, whatever the family: 400 in a path, a refused item in a bulk body.
INVALID = ["999.1.1.1", "256.0.0.1", "01.2.3.4", "198.018.0.1", "1.2.3", "198.18.0.1.", "198.18.0.1.5",
           "0x7f.0.0.1", "3323068417", "-1.2.3.4", "a.b.c.d", "198.18.0.1/33", "198.18.0.0/0", "198.18.0.0/024",
           "198.18.0.0/-1", "198.18.0.0/+24", "198.18.0.0/abc", "198.18.0.0/24.0", "198.18.0.0/255.255.255.0",
           "198.18.0.0/99999999999999999999", "198.18.0.9/29", "198.18.1.7/24", "::ffff:198.18.0.1",
           "::ffff:c612:1", "2001:db8::1::2", "2001:db8:::1", "gggg::1", "2001:db8:0:0:0:0:0:0:1",
           "[2001:db8::1]", "2001:db8::/129", "2001:db8::/0", "2001:db8::/048", "2001:db8::1/64",
           "2001:db8:2::1/48", ":"]
INVALID_PATH = {"ipv4": INVALID + ["2001:db8::1", ""], "ipv6": INVALID + ["198.18.0.1", "fe80::1%eth0", ""]}
INVALID_ITEM = INVALID + ["198.18.0.1/", "/24", "198.18.0.1//32", "\uff11\uff19\uff18.18.0.1", "2001:db8::1%eth0",
                          "fe80::1%lo", "198.18.0.1" + " " * 60, "x" * 65, "198.18.0.1\n", " 198.18.0.1", ""]
CHAIN_TRICKS = ["a" * 29, "f2b.web", "f2b:web", "f2b*", "$(id)", "..", ".", "f2b-w\u00e9b", "f2b;web", "-", "_",
                "f2b-web\x00", "f2b-web\t"]
UNKNOWN_CHAIN = "nochain"


@dataclass(frozen=True)
class User:
    name: str
    password: str
    chains: tuple[str, ...]  # fnmatch patterns, as in the config
    read_only: bool = False
    allowed_here: bool = True  # allow_from admits the fuzzer's loopback addresses

    def may_use(self, chain: str) -> bool:
        return self.allowed_here and any(fnmatchcase(chain, p) for p in self.chains)


@dataclass(frozen=True)
class Profile:
    """What the generator must know of the daemon's config."""

    users: tuple[User, ...]  # users[0] may write every chain
    chains: tuple[str, ...]
    never_block: tuple[str, ...]
    max_bulk_items: int = 10_000
    max_timeout: int = 10 * 365 * 86400


@dataclass(frozen=True)
class Case:
    index: int
    family: str  # "family/variant", for reports
    data: bytes
    owed: int = 1  # answers a correct server must send before it closes
    refuse: bool = False  # bad input: every answer must be a 4xx
    framed: bool = True  # `data` is exactly one request, so the connection may carry the next case
    head: bool = False  # a HEAD is in it: an answer may leave its body out
    bad_auth: bool = False  # may count as a failed login (the checker sends it from an address of its own)
    writes: int = 0  # audit lines it may cause (a timed block counts twice: its expiry is audited too)
    blocks: frozenset[tuple[str, str]] = frozenset()  # (chain, network) it may leave blocked
    expect: frozenset[int] | None = None  # the first answer's status, when it is known exactly
    items: tuple[str, ...] | None = None  # bulk, per item: "ok" (200 or 201), "fail" (a 4xx) or "any"


@dataclass
class Meaning:
    """What an unmutated request means to a correct server."""

    expect: frozenset[int] | None
    refuse: bool
    blocks: frozenset[tuple[str, str]] = frozenset()
    writes: int = 0
    items: tuple[str, ...] | None = None


@dataclass
class Draft:
    """A request being built and mutated."""

    method: bytes
    target: bytes
    user: User | None
    fields: list[bytes] = field(default_factory=list)  # field lines without their line ending
    body: bytes = b""
    version: bytes = b"HTTP/1.1"
    eol: bytes = b"\r\n"
    line_eols: dict[int, bytes] = field(default_factory=dict)  # a field line's own ending, when it differs
    request_line: bytes | None = None  # written as is instead of method, target and version
    request_line_end: bytes | None = None

    def find(self, name: bytes) -> int | None:
        for i, line in enumerate(self.fields):
            if line.split(b":", 1)[0].lower() == name.lower():
                return i
        return None

    def set_field(self, name: bytes, value: bytes) -> None:
        i = self.find(name)
        if i is None:
            self.fields.append(name + b": " + value)
        else:
            self.fields[i] = name + b": " + value

    def drop(self, name: bytes) -> None:
        self.fields = [f for f in self.fields if f.split(b":", 1)[0].lower() != name.lower()]
        self.line_eols.clear()

    def set_body(self, body: bytes) -> None:
        self.body = body
        self.set_field(b"Content-Length", str(len(body)).encode())

    def head(self) -> bytes:
        line = self.request_line
        if line is None:
            line = self.method + b" " + self.target + (b" " + self.version if self.version else b"")
        out = [line, self.eol if self.request_line_end is None else self.request_line_end]
        for i, f in enumerate(self.fields):
            out += [f, self.line_eols.get(i, self.eol)]
        out.append(self.eol)
        return b"".join(out)

    def encode(self) -> bytes:
        return self.head() + self.body

    @property
    def is_head(self) -> bool:
        return self.request_line is None and self.method == b"HEAD"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


# A mutation's verdict on the request it changed:
#   SAME:  the answer is what the unmutated request gets;
#   ANY:   a correct server may take it or refuse it (the RFCs allow either): what it may change is kept;
#   INERT: any status below 500, but nothing may change;
#   BAD:   invalid by the RFCs and by the daemon's documented rules alike: a 4xx, and nothing changes.
SAME, ANY, INERT, BAD = "same", "any", "inert", "bad"


@dataclass
class Outcome:
    verdict: str
    variant: str
    owed: int = 1
    framed: bool = True
    bad_auth: bool = False


class Generator:
    def __init__(self, profile: Profile):
        self.p = profile
        self.never = [ipaddress.ip_network(n) for n in profile.never_block]
        self.admin = profile.users[0]
        self.families: list[tuple[str, int, Callable[[random.Random, int], Case]]] = [
            ("valid", 16, self.valid),
            ("request-line", 10, self.request_line),
            ("path", 11, self.path),
            ("header", 14, self.header),
            ("smuggle", 4, self.smuggle),
            ("content-length", 9, self.content_length),
            ("chunked", 4, self.chunked),
            ("authorization", 8, self.authorization),
            ("bulk", 13, self.bulk),
            ("query", 7, self.query),
            ("stream", 4, self.stream),
        ]

    def case(self, seed: int, index: int) -> Case:
        rng = random.Random(f"web-ipt-d fuzz {seed} {index}")
        make = rng.choices([f[2] for f in self.families], [f[1] for f in self.families])[0]
        return make(rng, index)

    def _finish(self, index: int, family: str, d: Draft, m: Meaning, o: Outcome) -> Case:
        v = o.verdict
        refuse = m.refuse or v == BAD
        keeps = v in (SAME, ANY) and not refuse
        return Case(index, f"{family}/{o.variant}", d.encode(), owed=o.owed, refuse=refuse, framed=o.framed,
                    head=d.is_head, bad_auth=o.bad_auth or self._bad_credentials(d),
                    writes=m.writes if keeps else 0, blocks=m.blocks if keeps else frozenset(),
                    expect=m.expect if v == SAME else None, items=m.items if v == SAME else None)

    def _bad_credentials(self, d: Draft) -> bool:
        """Credentials sent that are not exactly one user's: the daemon may count a failed login."""
        sent = [f.partition(b":")[2] for f in d.fields if f.split(b":", 1)[0].lower() == b"authorization"]
        if not sent:
            return False
        return len(sent) > 1 or d.user is None or sent[0] != b" " + basic(d.user.name, d.user.password)

    def _cut_credentials(self, d: Draft, data: bytes, cut: int) -> bool:
        """Credentials cut short (or wrong to begin with): a failed login."""
        if self._bad_credentials(d):
            return True
        start = data.find(b"Authorization: ")
        if start < 0 or start >= cut or d.user is None:
            return False
        return start + len(b"Authorization: " + basic(d.user.name, d.user.password)) > cut

    # -- the families -------------------------------------------------------------------------------------

    def valid(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index)
        o = Outcome(SAME, d.method.decode())
        r = rng.random()
        if r < 0.1:
            d.version, o.variant = b"HTTP/1.0", o.variant + "+http1.0"
            if rng.random() < 0.5:
                d.fields.append(b"Connection: keep-alive")
        elif r < 0.2:
            d.fields.append(b"Connection: close")
        elif r < 0.3:
            d.fields.append(b"Expect: 100-continue")
            o.variant += "+expect"
        elif r < 0.4:
            d.eol, o.variant = b"\n", o.variant + "+lf"  # the daemon takes a bare LF (tests/test_http_wire.py)
        elif r < 0.5:
            d.fields = [self._recase(rng, f, name_only=True) for f in d.fields]
        elif r < 0.6:
            d.fields.insert(rng.randrange(len(d.fields) + 1), b"X-Note: caf\xc3\xa9 \xe9\xff")  # obs-text
        elif r < 0.7 and d.method != b"POST":
            d.set_body(rng.randbytes(rng.choice([1, 100, 4000])))  # a body nobody reads
        return self._finish(index, "valid", d, m, o)

    def request_line(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index)
        choice = rng.randrange(13)
        o = Outcome(BAD, "")
        line = d.method + b" " + d.target + b" " + d.version
        if choice == 0:
            o.variant, d.method = "method-case", self._recase(rng, d.method, force=True)
        elif choice == 1:
            o.variant = "method-unknown"
            d.method = rng.choice([b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT", b"FOO", b"PROPFIND", b"PRI", b"BREW",
                                   b"GETT", b"PUTS"])
        elif choice == 2:
            o.variant, d.method = "method-long", b"G" * rng.randint(17, 300)
        elif choice == 3:
            o.variant = "method-junk"
            d.method = rng.choice([b"G3T", b"GET-", b"GE\x00T", b"G\xc3\x89T", b"GET/", b"\x16\x03\x01", b"*",
                                   b"GET\x7f", b"PU\tT", b""])
        elif choice == 4:
            o.variant = "version"
            d.version = rng.choice([b"HTTP/1.0", b"HTTP/1.2", b"HTTP/1.9", b"HTTP/2.0", b"HTTP/2", b"HTTP/0.9",
                                    b"HTTP/1", b"HTTP/1.1.1", b"http/1.1", b"HTTP/11", b"HTTP/1.10", b"HTTPS/1.1",
                                    b"HTTP/1.x", b"HTTP/ 1.1", b"HTTP/1.1\x00", b"\xffHTTP/1.1", b"HTTP/3.0"])
            if d.version in (b"HTTP/1.0", b"HTTP/1.2", b"HTTP/1.9"):
                o.verdict = ANY  # a 1.x a 1.1 server may answer as its own (RFC 9110 section 2.5)
        elif choice == 5:
            o.variant, d.version = "http0.9", b""  # "GET /health": no version at all
        elif choice == 6:
            o.variant = "separator"
            sep = rng.choice([b"  ", b"\t", b"\x0b", b"\x0c", b"\xa0", b" \t"])
            at = rng.randrange(2)
            parts = line.split(b" ", 2)
            d.request_line = b" ".join(parts[:at + 1]) + sep + b" ".join(parts[at + 1:])
            if rng.random() < 0.3:
                d.request_line = rng.choice([b" ", b"\t"]) + d.request_line
            elif rng.random() < 0.3:
                d.request_line += rng.choice([b" ", b"\t"])
        elif choice == 7:
            o.variant, o.framed = "cr-lf", False
            how = rng.randrange(4)
            if how == 0:
                d.request_line_end = b"\r\r\n"
            elif how == 1:
                d.request_line_end = b"\r"  # the request line runs on into the first field
            elif how == 2:
                d.request_line = d.method + b" " + d.target + b"\r " + d.version
            else:
                half = max(1, len(d.target) // 2)
                d.request_line = d.method + b" " + d.target[:half] + b"\n" + d.target[half:] + b" " + d.version
        elif choice == 8:
            o.variant, o.verdict = "absolute-form", ANY  # RFC 9112 section 3.2.2 wants it taken
            d.target = rng.choice([b"https://127.0.0.1:8820", b"https://localhost:8820", b"http://127.0.0.1",
                                   b"https://127.0.0.1"]) + d.target
        elif choice == 9:
            o.variant = "not-origin-form"
            d.target = rng.choice([b"*", d.target.lstrip(b"/"), b"?" + d.target, b"../" + d.target.lstrip(b"/")])
        elif choice == 10:
            o.variant = "empty-target"
            d.request_line = d.method + b"  " + d.version
        elif choice == 11:
            o.variant = "huge-target"
            n = rng.randint(*HUGE_TARGET)
            d.target = rng.choice([d.target + b"?timeout=" + b"1" * n, b"/" + b"a" * n, d.target + b"/" + b"x" * n,
                                   d.target.partition(b"?")[0] + b"%41" * (n // 3)])
        else:
            o.variant = "long-target"  # long but under the limit: an extra segment no route has
            tail = bytes(rng.choice(b"abcdefgh0123456789.-_") for _ in range(rng.randint(500, 6000)))
            d.target = d.target.partition(b"?")[0] + b"/" + tail
        return self._finish(index, "request-line", d, m, o)

    def path(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index, routes=("entry",))
        path, _, query = d.target.partition(b"?")
        segs = path.split(b"/")  # ["", "chain", name, family, address(, prefix)]
        o = Outcome(BAD, "")
        choice = rng.randrange(14)
        if choice == 0:
            o.variant, o.verdict = "percent-plain", ANY  # encoded plain characters decode to the same path
            segs = [self._percent(rng, s) for s in segs]
        elif choice == 1:
            o.variant = "percent-double"  # decoded once, "%3A..." is no valid segment
            at = rng.randrange(1, len(segs))
            segs[at] = b"%25" + b"%02X" % rng.choice(b"0123456789:.") + segs[at]
        elif choice == 2:
            o.variant = "percent-slash"  # an encoded slash is data, never a separator
            if len(segs) == 6:
                segs[4:6] = [segs[4] + rng.choice([b"%2F", b"%2f", b"%252F"]) + segs[5]]
            else:
                segs[rng.randrange(2, len(segs))] += rng.choice([b"%2F", b"%2f"]) + b"32"
        elif choice == 3:
            o.variant, o.verdict = "dot-segments", ANY  # they normalise away (RFC 3986 section 5.2.4)
            at = rng.randrange(2, len(segs))
            segs[at:at] = rng.choice([[b"."], [b"x", b".."], [b"%2e"], [b"zz", b"%2E%2E"]])
        elif choice == 4:
            o.variant, o.verdict = "dot-segments-up", INERT  # they normalise to a path without the address
            segs += [b".."] * (len(segs) - 4) + rng.choice([[], [b""]])
        elif choice == 5:
            o.variant = "unicode"
            at = rng.randrange(2, len(segs))
            raw = rng.choice(["\uff12", "\u0661", "\u200b", "\u00e9", "\u2024", "\ufe52", "\U0001f525"]).encode()
            segs[at] += raw if rng.random() < 0.5 else b"".join(b"%%%02X" % b for b in raw)
        elif choice == 6:
            o.variant = "nul-and-controls"
            at = rng.randrange(1, len(segs))
            c = rng.choice([b"\x00", b"%00", b"\x01", b"%01", b"\x7f", b"%7F", b"\x1b", b"%0A", b"%0D%0A", b"\x0b",
                            b"%09", b"\x85", b"\xa0"])
            pos = rng.randrange(len(segs[at]) + 1)
            segs[at] = segs[at][:pos] + c + segs[at][pos:]
        elif choice == 7:
            o.variant = "bad-percent"
            segs[rng.randrange(2, len(segs))] += rng.choice([b"%", b"%2", b"%zz", b"%g0", b"%ff", b"%c3%28",
                                                             b"%e2%82", b"%C0%AE"])
        elif choice == 8:
            o.variant, o.verdict = "slashes", ANY  # a server may merge or strip them
            if rng.random() < 0.5:
                segs.insert(rng.randrange(1, len(segs)), b"")
            else:
                segs.append(b"")
        elif choice == 9:
            o.variant, o.verdict = "fragment", ANY  # never sent by a client, but a server may drop it
            segs[-1] += b"#" + rng.choice([b"", b"x", b"/../../chains"])
        elif choice == 10:
            o.variant, o.verdict = "backslash", ANY
            segs = [b"\\".join(segs)]
        elif choice == 11:
            o.variant = "family"
            segs[3] = rng.choice([b"ipv5", b"inet", b"4", b"ipv", b"ip", b"ipv46", b"", segs[3].upper()])
            if segs[3] in (b"IPV4", b"IPV6"):
                o.verdict = ANY  # case-sensitive here, but a server that folds case harms nobody
        elif choice == 12:
            o.variant = "chain"
            trick = rng.choice(CHAIN_TRICKS + ["UPPER"])
            segs[2] = segs[2].upper() if trick == "UPPER" else trick.encode()
            if trick == "UPPER":
                o.verdict = ANY
        else:
            o.variant = "route"
            segs[1] = rng.choice([b"CHAIN", b"Chain", b"chains", b"chai", b"chainn", b"chain;x", b"chain%20"])
            if segs[1] in (b"CHAIN", b"Chain"):
                o.verdict = ANY
        d.target = b"/".join(segs) + (b"?" + query if query else b"")
        return self._finish(index, "path", d, m, o)

    def header(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index)
        o = Outcome(BAD, "")
        choice = rng.randrange(20)
        at = rng.randrange(len(d.fields) + 1)
        if choice == 0:
            # RFC 9110 section 5.5: reject, or read the CR as a space. The smuggle family makes the bad kind.
            o.variant, o.verdict = "bare-cr", ANY
            d.fields.insert(at, b"X-Note: a\rb" + rng.choice([b"", b"\rX-Y: 1"]))
        elif choice == 1:
            o.variant, o.verdict = "bare-lf-some", SAME  # the daemon takes a bare LF (tests/test_http_wire.py)
            for i in range(len(d.fields)):
                if rng.random() < 0.5:
                    d.line_eols[i] = b"\n"
        elif choice == 2:
            o.variant, o.verdict = "obs-fold", ANY  # RFC 9112 section 5.2: reject, or unfold into a space
            i = rng.randrange(len(d.fields))
            line = d.fields[i]
            cut = line.rfind(b" ")
            if cut > line.find(b":") >= 0:
                d.fields[i] = line[:cut] + d.eol + rng.choice([b" ", b"\t", b"  \t"]) + line[cut + 1:]
            else:
                d.fields.insert(i, b"X-Note: a" + d.eol + b" folded")
        elif choice == 3:
            o.variant = "no-colon"
            d.fields.insert(at, rng.choice([b"X-Note a", b"Authorization", b"Host 127.0.0.1", b"junk"]))
        elif choice == 4:
            o.variant = "space-before-colon"  # RFC 9112 section 5.1: a 400
            i = rng.randrange(len(d.fields))
            name, _, value = d.fields[i].partition(b":")
            d.fields[i] = name + rng.choice([b" ", b"\t", b"  "]) + b":" + value
        elif choice == 5:
            o.variant = "bad-name"
            d.fields.insert(at, rng.choice([b"", b"X Note", b"X(Note)", b"X-N\xc3\xb6te", b"X@N", b"X\x00N", b"[x]",
                                            b"X\"", b"X{}", b"X/N"]) + b": a")
        elif choice == 6:
            o.variant = "control-in-value"  # not a field-vchar: no recovery but for NUL (RFC 9110 5.5)
            c = rng.choice([b"\x00", b"\x7f", b"\x01", b"\x1b", b"\x08"])
            d.fields.insert(at, b"X-Note: a" + c + b"b")
            if c == b"\x00":
                o.verdict = ANY
        elif choice == 7:
            o.variant, o.verdict = "many-fields", ANY  # a 431 is the daemon's answer, but taking them is no bug
            d.fields[at:at] = [b"X-H%d: %d" % (i, i) for i in range(rng.randint(*HUGE_FIELD_COUNT))]
        elif choice == 8:
            o.variant, o.verdict = "some-fields", SAME
            d.fields[at:at] = [b"X-H%d: %d" % (i, i) for i in range(rng.randint(1, 40))]
        elif choice == 9:
            o.variant, o.verdict = "huge-field", ANY
            name = rng.choice([b"X-Note", b"Cookie", b"Host", b"User-Agent"])
            d.fields.insert(at, name + b": " + b"v" * rng.randint(*HUGE_FIELD))
        elif choice == 10:
            o.variant, o.verdict = "big-field", SAME
            d.fields.insert(at, b"X-Note: " + b"v" * rng.randint(1000, 6000))
        elif choice == 11:
            o.variant, o.verdict = "host", ANY  # RFC 9112 section 3.2 wants a 400; the daemon ignores Host
            d.drop(b"Host")
            d.fields += rng.choice([[], [b"Host: 127.0.0.1", b"Host: other.example"], [b"Host: "],
                                    [b"Host: a b\xff/c"]])
        elif choice == 12:
            o.variant, o.verdict = "connection", SAME
            d.fields.append(b"Connection: " + rng.choice([b"keep-alive", b"Keep-Alive", b"close", b"CLOSE",
                                                           b"upgrade", b"foo, bar", b"", b"keep-alive, close"]))
        elif choice == 13:
            o.variant, o.verdict = "expect", ANY  # an unknown expectation may be a 417
            d.fields.append(b"Expect: " + rng.choice([b"100-continue", b"200-ok", b"", b"100-continue, x"]))
        elif choice == 14:
            # RFC 9112 section 2.2: reject, or skip whitespace-led lines after the request line.
            o.variant, o.verdict, o.framed = "whitespace-first-line", ANY, False
            d.fields.insert(0, rng.choice([b" X-Note: a", b"\tX-Note: a", b" "]))
        elif choice == 15:
            o.variant, o.verdict = "name-case", SAME
            d.fields = [self._recase(rng, f, name_only=True) for f in d.fields]
        elif choice == 16:
            o.variant, o.verdict = "obs-text", SAME
            d.fields.append(b"X-Note: " + bytes(OBS_TEXT[b] for b in rng.randbytes(rng.randint(1, 50))))
        elif choice == 17:
            # An empty line ends the head early; what follows is a second "request" of junk.
            o.variant, o.verdict, o.framed = "empty-line-inside", ANY, False
            d.fields.insert(at, b"")
        elif choice == 18:
            o.variant, o.verdict = "bare-lf-in-value", SAME  # LF alone ends a line here: two fields
            d.fields.insert(at, b"X-Note: a\nX-Other: b")
        else:
            o.variant = "lf-cr"  # "\n\r" is no line ending: the next line starts with a CR
            d.fields.insert(at, b"X-Note: a\n\rX-Other: b")
        return self._finish(index, "header", d, m, o)

    def smuggle(self, rng: random.Random, index: int) -> Case:
        """Good credentials where no field line starts: they must log nobody in, whatever the server does."""
        d, m = self.base(rng, index, user=None, routes=("entry",), methods=(b"PUT", b"DELETE"))
        creds = b"Authorization: " + basic(self.admin.name, self.admin.password)
        variants = {
            "bare-cr": b"X-Note: a\r" + creds,  # RFC 9110 5.5: reject, or the CR is a space in X-Note's value
            "obs-fold": b"X-Note: a" + d.eol + b" " + creds,  # reject, or unfold into X-Note's value
            "nul": b"X-Note: a\x00" + creds,
            "space-before-colon": creds.replace(b":", b" :", 1),  # RFC 9112 5.1: must be a 400
            "whitespace-first-line": b" " + creds,  # RFC 9112 2.2: reject, or skip the line unread
            "in-value": b"X-Note: " + creds,
        }
        variant = rng.choice(sorted(variants))
        d.fields.insert(0 if variant == "whitespace-first-line" else rng.randrange(len(d.fields) + 1),
                        variants[variant])
        # No failed login either way: the daemon sees credentials that work, or none at all.
        return self._finish(index, "smuggle", d, m, Outcome(BAD, variant))

    def content_length(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index)
        if not d.body:
            d.set_body(rng.randbytes(rng.randint(1, 64)))
        n = len(d.body)
        o = Outcome(BAD, "", framed=False)  # RFC 9112 section 6.3: invalid framing is a 400, then close
        choice = rng.randrange(11)
        if choice == 0:
            o.variant, value = "negative", rng.choice([b"-1", b"-%d" % n, b"-0"])
        elif choice == 1:
            o.variant = "not-decimal"
            value = rng.choice([b"0x%x" % n, b"%de0" % n, b"%d.0" % n, b"+%d" % n, b"", b"abc", b"\xd9\xa4",
                                b"%d %d" % (n, n), b"%d;x" % n, b"\xef\xbc\x94", b"1_0"])
        elif choice == 2:
            o.variant, o.owed = "huge", 0  # refused from the number, or waited for: the body never comes
            value = rng.choice([b"9" * rng.randint(9, 30), b"9" * rng.randint(4400, 6000), b"18446744073709551616",
                                b"9223372036854775808", b"4294967296", b"100000000"])
            d.body = b""
        elif choice == 3:
            o.variant, o.owed, value = "one-more", 0, str(n + 1).encode()  # the body never completes
        elif choice == 4:
            # A complete request with a shorter body, then a stray byte. A bulk body cut short is no JSON.
            o.variant, value = "one-less", str(n - 1).encode()
            o.verdict = BAD if d.method == b"POST" else ANY
        elif choice == 5:
            o.variant, o.verdict, o.framed, value = "leading-zeros", ANY, True, b"000%d" % n
        elif choice == 6:
            o.variant, o.verdict, o.framed = "duplicate-same", ANY, True  # RFC 9110 8.6: may be taken as one
            d.fields.append(b"Content-Length: %d" % n)
            value = b"%d" % n
        elif choice == 7:
            o.variant, value = "duplicate-differ", b"%d" % n
            d.fields.append(b"Content-Length: %d" % (n + rng.choice([1, -1, 10])))
        elif choice == 8:
            o.variant, o.verdict, o.framed, value = "list-same", ANY, True, b"%d, %d" % (n, n)
        elif choice == 9:
            o.variant, o.verdict, o.framed = "whitespace", ANY, True  # surrounding whitespace is no part of it
            value = rng.choice([b" %d " % n, b"%d\t" % n])
        else:
            o.variant, value = "zero", b"0"  # the body becomes a second "request"
            o.verdict = BAD if d.method == b"POST" else ANY
        d.set_field(b"Content-Length", value)
        return self._finish(index, "content-length", d, m, o)

    def chunked(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index)
        body = d.body or rng.randbytes(rng.randint(0, 40))
        d.drop(b"Content-Length")
        good = self._chunk(rng, body)
        o = Outcome(BAD, "", framed=False)
        choice = rng.randrange(8)
        coding = b"chunked"
        if choice == 0:
            o.variant, o.verdict, d.body = "valid", ANY, good  # read it, or refuse it with a 4xx
        elif choice == 1:
            o.variant, o.verdict, d.body = "with-length", ANY, good  # RFC 9112 6.3: chunked wins, or a 400
            d.fields.append(b"Content-Length: %d" % len(body))
        elif choice == 2:
            o.variant = "bad-size"
            size = rng.choice([b"zz", b"-1", b"0x5", b" 5", b"ffffffffffffffffffff", b"\xff"])
            d.body = size + b"\r\n" + body + b"\r\n0\r\n\r\n"
        elif choice == 3:
            o.variant, o.owed = "short", 0  # the chunk says more than comes
            d.body = b"%x\r\n" % (len(body) + 50) + body
        elif choice == 4:
            o.variant, o.owed = "no-last-chunk", 0
            d.body = b"%x\r\n" % len(body) + body + b"\r\n" if body else b""
        elif choice == 5:
            o.variant = "no-crlf-after-data"
            d.body = b"%x\r\n" % (len(body) + 1) + body + b"XY0\r\n\r\n"
        elif choice == 6:
            o.variant, d.body = "other-coding", good
            # Not chunked last (RFC 9112 6.3: a 400), or a coding nobody knows (a 501 there; 5xx are bugs here).
            coding = rng.choice([b"gzip", b"identity", b"chunked, gzip", b"xchunked", b"chunked, chunked",
                                 b"compress", b"chunked;q=1"])
        else:
            o.variant, o.verdict = "extensions-and-trailers", ANY
            d.body = (b"%x;name=value;x\r\n" % len(body) + body + b"\r\n" if body else b"") + \
                b"0;end\r\nX-Trailer: 1\r\n\r\n"
        d.fields.append(b"Transfer-Encoding: " + coding)
        return self._finish(index, "chunked", d, m, o)

    def authorization(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index, user=self.admin, routes=("version", "chains", "list", "entry", "bulk"))
        good = basic(self.admin.name, self.admin.password)
        token = good.split(b" ", 1)[1]
        o = Outcome(BAD, "", bad_auth=True)
        choice = rng.randrange(14)
        if choice == 0:
            o.variant = "bad-base64"
            value = b"Basic " + rng.choice([b"!" + token, token[:4] + b"*" + token[4:], b"====", b"a", b"YQ",
                                            token[:-4], b"%s%%3D" % token.rstrip(b"=")])
        elif choice == 1:
            o.variant, o.verdict = "padding", ANY  # wrong padding, that a lenient decoder still reads
            value = b"Basic " + rng.choice([token + b"=", token.rstrip(b"="), token + b"===="])
        elif choice == 2:
            o.variant = "no-colon"
            value = b"Basic " + base64.b64encode((self.admin.name + self.admin.password).encode())
        elif choice == 3:
            o.variant = "control-chars"  # RFC 7617 section 2: none in user-id or password
            c = rng.choice(["\x00", "\x01", "\x1f", "\x7f", "\n", "\r"])
            name, password = self.admin.name, self.admin.password
            raw = rng.choice([f"{name}{c}:{password}", f"{name}:{password}{c}"])
            value = b"Basic " + base64.b64encode(raw.encode())
        elif choice == 4:
            o.variant = "huge"
            value = b"Basic " + base64.b64encode(b"admin:" + b"p" * rng.randint(4000, 9000))
        elif choice == 5:
            o.variant = "scheme"
            value = rng.choice([b"Bearer " + token, b"Digest " + token, b"Basic", b"Basic ", b"Basic" + token,
                                b"Basi " + token, token, b"Negotiate YII=", b"Basic=" + token])
        elif choice == 6:
            o.variant, o.verdict = "scheme-case", ANY  # RFC 9110 section 11.1: the scheme is case-insensitive
            value = rng.choice([b"basic ", b"BASIC ", b"bAsIc "]) + token
        elif choice == 7:
            o.variant = "wrong-password"
            user = rng.choice(self.p.users)
            value = basic(user.name, rng.choice([user.password + "x", user.password[:-1], "", user.password.upper()]))
        elif choice == 8:
            o.variant = "unknown-user"
            value = basic(rng.choice(["root", "Admin", self.admin.name + " ", "", "\u00e9", "x" * 300]),
                          self.admin.password)
        elif choice == 9:
            o.variant = "not-utf8"
            value = b"Basic " + base64.b64encode(self.admin.name.encode() + b":" + rng.choice(
                [b"\xff", b"\xe9", b"\xc3\x28", b"\xed\xa0\x80"]))
        elif choice == 10:
            o.variant = "raw-bytes"
            value = b"Basic " + token[:5] + rng.choice([b"\xff", b"\xc3\xa9", b"\x80"]) + token[5:]
        elif choice == 11:
            o.variant, o.verdict = "spaces", ANY  # 1*SP after the scheme; OWS around the value
            value = rng.choice([b"Basic  " + token, b"Basic " + token + b" ", b"Basic " + token + b"\t",
                                b"Basic \t" + token, b"Basic\t" + token])
        elif choice == 12:
            o.variant, value = "empty", b""
        else:
            o.variant, value = "two", rng.choice([good + b", " + good, good + b" " + token])
            if rng.random() < 0.5:
                other = rng.choice([good, basic("reader", self._password("reader")), b"Basic x"])
                o.variant, o.verdict, value = "duplicate", ANY if other == good else BAD, good
                d.fields.append(b"Authorization: " + other)
        i = d.find(b"Authorization")
        assert i is not None
        d.fields[i] = b"Authorization: " + value
        return self._finish(index, "authorization", d, m, o)

    def bulk(self, rng: random.Random, index: int) -> Case:
        d, m = self.base(rng, index, routes=("bulk",))
        o = Outcome(SAME, "")
        choice = rng.randrange(16)
        if choice < 5:
            o.variant = "items"  # good, refused and doubtful items, as base() made them
        elif choice == 5:
            o.variant, o.verdict = "not-json", BAD
            d.set_body(rng.choice([b"", b"[", b"{", b"nul", b"<a/>", b"[1,]", b"['198.18.0.1']", b"[\"x\"", b"\x00",
                                   b"[\"198.18.0.1\"] x", b"198.18.0.1", b"[\"198.18.0.1\",]",
                                   b"\xff" + rng.randbytes(rng.randint(1, 300))]))
        elif choice == 6:
            o.variant, o.verdict = "not-a-list", BAD
            d.set_body(rng.choice([b"{}", b"{\"items\": [\"198.18.0.1\"]}", b"1", b"\"198.18.0.1\"", b"null",
                                   b"true", b"[]", b"  []  ", b"-0", b"1e999"]))
        elif choice == 7:
            o.variant, o.verdict = "nested", INERT  # a 400, or a 200 with every item refused
            depth = rng.choice([2, 3, 50, 900, 1100, 5000, 100_000, 300_000])
            if rng.random() < 0.7:
                inner = rng.choice([b"", b"\"198.18.0.1\"", b"1", b"{}"])
                d.set_body(b"[" * depth + inner + b"]" * depth)
            else:
                d.set_body(b"[" + b"{\"a\":" * depth + b"1" + b"}" * depth + b"]")
        elif choice == 8:
            o.variant, o.verdict = "not-strings", INERT
            things = [b"1", b"2.5", b"-1", b"1e999", b"NaN", b"Infinity", b"-Infinity", b"true", b"null", b"{}",
                      b"[]", b"1" * rng.randint(4000, 5000), b"3323068417", b"{\"network\": \"198.18.0.1\"}",
                      b"[\"198.18.0.1\"]"]
            d.set_body(b"[" + b",".join(rng.choice(things) for _ in range(rng.randint(1, 12))) + b"]")
        elif choice == 9:
            o.variant, o.verdict = "huge-string", INERT
            d.set_body(b"[\"" + rng.choice([b"1", b"a", b":"]) * rng.randint(65, 200_000) + b"\"]")
        elif choice == 10:
            o.variant, o.verdict = "not-utf8", BAD
            pos = rng.randrange(1, len(d.body))
            d.set_body(d.body[:pos] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]) + d.body[pos:])
        elif choice == 11:
            o.variant, o.verdict = "bom-or-utf16", ANY  # RFC 8259 section 8.1: a parser may skip a BOM
            d.set_body(rng.choice([b"\xef\xbb\xbf" + d.body, d.body.decode().encode(rng.choice(["utf-16", "utf-32"]))]))
        elif choice == 12:
            o.variant, o.verdict = "too-many", BAD
            d.set_body(json.dumps(["198.18.0.1"] * (self.p.max_bulk_items + rng.randint(1, 50))).encode())
        elif choice == 13:
            o.variant, o.verdict, o.owed, o.framed = "too-long", BAD, 0, False
            d.set_field(b"Content-Length", b"%d" % HUGE_LENGTH)
            d.body = b""  # refused from the length alone, or waited for: it never comes
        elif choice == 14:
            o.variant = "escapes"  # the same strings, with some characters as \u escapes
            d.set_body(self._escape(rng, d.body))
        else:
            o.variant = "whitespace"
            d.set_body(b" \n\t\r" + d.body.replace(b", ", b" ,\n ") + b" \n")
        return self._finish(index, "bulk", d, m, o)

    def query(self, rng: random.Random, index: int) -> Case:
        method = rng.choice((b"PUT", b"PUT", b"PUT", b"POST", b"GET", b"DELETE", b"HEAD"))
        d, m = self.base(rng, index, routes=("bulk",) if method == b"POST" else ("entry",), methods=(method,),
                         query=False)
        writes = method in (b"PUT", b"POST")
        t = self.p.max_timeout
        good = [b"timeout=-1", b"timeout=0", b"timeout=1", b"timeout=2", b"timeout=%d" % t, b"expire=3600",
                b"timeout=86400", b"expire=-1"]
        bad = [b"timeout=%d" % (t + 1), b"timeout=-2", b"timeout=-5", b"timeout=1.5", b"timeout=1e3", b"timeout=0x10",
               b"timeout=+60", b"timeout=", b"timeout", b"timeout=abc", b"TIMEOUT=60", b"timeout=" + b"9" * 31,
               b"timeout=60&timeout=60", b"timeout=60&expire=60", b"foo=1", b"timeout=60&foo=1", b"&", b"=",
               b"timeout==60", b"timeout=60;foo=1", b"timeout=60&", b"&timeout=60", b"timeout=%00", b"timeout=60?",
               b"timeout=-9223372036854775809", b"timeout=\xd9\xa1", b"timeout=\xef\xbc\x91", b"timeout=1 2"]
        doubtful = [b"timeout=%36%30", b"time%6Fut=60", b"timeout=0060", b"timeout=-01", b"timeout=-0"]
        r = rng.random()
        if r < 0.35:
            # Elsewhere than PUT and POST, any query is refused (tests/test_bad_input.py).
            q, o = rng.choice(good), Outcome(SAME if writes else BAD, "valid")
        elif r < 0.85:
            q, o = rng.choice(bad), Outcome(BAD, "invalid")
        else:
            q, o = rng.choice(doubtful), Outcome(ANY if writes else BAD, "doubtful")
        d.target = d.target + b"?" + q
        if writes and not q.endswith((b"=-1", b"=0")):
            m.writes *= 2  # a timed block: its expiry is audited too
        return self._finish(index, "query", d, m, o)

    def stream(self, rng: random.Random, index: int) -> Case:
        """Requests cut short, blank lines, junk, and two requests in one write."""
        d, m = self.base(rng, index)
        data = d.encode()
        head = len(d.head())
        choice = rng.randrange(7)
        if choice == 6:
            # Characters that are whitespace to Python's str.split() but not to HTTP: a line of them is no empty
            # line (RFC 9112 section 2.2), it is a malformed request line, which gets its 400.
            odd = bytes(rng.choice(b"\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0") for _ in range(rng.randint(1, 4)))
            return Case(index, "stream/not-blank", odd + rng.choice([b"\r\n", b"\n"]) + data, owed=1, refuse=True,
                        framed=False, head=d.is_head, bad_auth=self._bad_credentials(d))
        if choice == 0 or (choice == 1 and not d.body):
            # Cut inside the head: the request never completes. Answering a GET does no harm, but a change
            # made on an incomplete request is a bug (RFC 9112 section 8).
            cut = rng.choice([rng.randrange(1, head - 1), head - 2, head - 1])  # anywhere, or at the blank line
            return Case(index, "stream/cut-head", data[:cut], owed=0, refuse=d.method in (b"PUT", b"DELETE", b"POST"),
                        framed=False, head=d.is_head, bad_auth=self._cut_credentials(d, data, cut))
        if choice == 1:
            cut = rng.randrange(head, len(data))
            return Case(index, "stream/cut-body", data[:cut], owed=0, refuse=True, framed=False, head=d.is_head,
                        bad_auth=self._bad_credentials(d))
        if choice == 2:
            # Only whitespace where a request line belongs. The one case where closing without an answer is
            # right: there is no request to answer yet. (RFC 9112 section 2.2 lets a server skip one empty
            # line before a request; the stdlib server, and this daemon, close instead.)
            junk = rng.choice([b"\r\n", b"\n", b" \r\n", b"\t\r\n", b"\r\n\r\n", b"   "])
            return Case(index, "stream/blank", junk + data, owed=0, refuse=m.refuse, framed=False, head=d.is_head,
                        bad_auth=self._bad_credentials(d), writes=m.writes, blocks=m.blocks)
        if choice == 3:
            d2, m2 = self.base(rng, index, user=d.user)
            return Case(index, "stream/pipelined", data + d2.encode(), owed=2, framed=False,
                        head=d.is_head or d2.is_head, bad_auth=self._bad_credentials(d) or self._bad_credentials(d2),
                        writes=m.writes + m2.writes, blocks=m.blocks | m2.blocks)
        if choice == 4:
            junk = rng.randbytes(rng.randint(1, 3000))
            if junk[:1].isspace():
                junk = b"!" + junk
            # Once its first line ends, it is a (bad) request line, which gets its 400.
            return Case(index, "stream/garbage", junk, owed=int(b"\n" in junk), refuse=True, framed=False,
                        bad_auth=True)
        junk, owed = rng.choice([(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 1), (b"GET / HTTP/1.1\r\n\r\n", 1),
                                 (b"\x00" * 64 + b"\r\n\r\n", 1), (b"GET /health HTTP/1.1\r\n\r", 0),
                                 (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 0)])
        return Case(index, "stream/preface", junk, owed=owed, refuse=not junk.startswith(b"GET /health"), framed=False)

    # -- the unmutated requests ---------------------------------------------------------------------------

    ROUTES = ("health", "version", "chains", "list", "entry", "entry", "entry", "entry", "entry", "bulk", "bulk",
              "bulk")

    def base(self, rng: random.Random, index: int, user: User | None | str = "pick",
             routes: tuple[str, ...] = ROUTES, methods: tuple[bytes, ...] | None = None,
             query: bool = True) -> tuple[Draft, Meaning]:
        if user == "pick":
            r = rng.random()
            user = (self.admin if r < 0.75 or len(self.p.users) == 1 else None if r < 0.82 else
                    rng.choice(self.p.users[1:]))
        assert user is None or isinstance(user, User)
        d = Draft(b"GET", b"/", user)
        d.fields.append(b"Host: 127.0.0.1")
        if rng.random() < 0.3:
            d.fields.append(rng.choice([b"User-Agent: fuzz/1", b"Accept: */*", b"Accept: application/json"]))
        if user is not None:
            d.fields.insert(rng.randrange(len(d.fields) + 1), b"Authorization: " + basic(user.name, user.password))
        route = rng.choice(routes)
        read = (b"GET", b"GET", b"HEAD")
        if route == "health":
            d.method, d.target = rng.choice(methods or read), b"/health"
            return d, Meaning(frozenset({200}), False)
        if route in ("version", "chains"):
            d.method, d.target = rng.choice(methods or read), b"/" + route.encode()
            return d, self._access(user, None, write=False)
        chain = rng.choice(self.p.chains + (UNKNOWN_CHAIN,))
        if route == "list":
            d.method, d.target = rng.choice(methods or read), b"/chain/" + chain.encode()
            return d, self._access(user, chain, write=False)
        if route == "entry":
            return self._entry(rng, index, d, chain, methods, query)
        d.method, d.target = b"POST", b"/chain/" + chain.encode()
        timeout = rng.choice([-1, 0, 1, 3600]) if query and rng.random() < 0.3 else None
        if timeout is not None:
            d.target += b"?timeout=%d" % timeout
        texts, verdicts, networks = self._items(rng, index)
        d.set_body(json.dumps(texts, ensure_ascii=rng.random() < 0.5).encode())
        access = self._access(user, chain, write=True)
        if access.refuse:
            return d, access
        writes = sum(v != "fail" for v in verdicts) * (2 if timeout and timeout > 0 else 1)
        return d, Meaning(frozenset({200}), False, frozenset((chain, str(n)) for n in networks), writes,
                          tuple(verdicts))

    def _entry(self, rng: random.Random, index: int, d: Draft, chain: str, methods: tuple[bytes, ...] | None,
               query: bool) -> tuple[Draft, Meaning]:
        d.method = rng.choice(methods or (b"PUT", b"PUT", b"GET", b"DELETE", b"DELETE", b"HEAD"))
        kind = rng.random()
        network: Network | None
        if kind < 0.7:
            family, text, network = self._unique(rng, index)
        elif kind < 0.8:
            family, text, network = self._shared(rng)
        elif kind < 0.9:
            family, text, network = self._never(rng)
        else:
            family = rng.choice(["ipv4", "ipv6"])
            text, network = rng.choice(INVALID_PATH[family]), None
        d.target = f"/chain/{chain}/{family}/{text}".encode()
        timeout = None
        if query and d.method == b"PUT" and rng.random() < 0.4:
            timeout = rng.choice([-1, 0, 1, 2, 60, 3600, self.p.max_timeout])
            d.target += rng.choice([b"?timeout=", b"?expire="]) + b"%d" % timeout
        write = d.method in (b"PUT", b"DELETE")
        access = self._access(d.user, chain, write)
        protected = network is not None and d.method == b"PUT" and self._protected(network)
        if access.refuse:
            # Refused for who asks; a server that looks at the address first may say 400 or 409 instead.
            assert access.expect is not None
            return d, Meaning(access.expect | ({400} if network is None else {409} if protected else set()), True)
        if network is None:
            return d, Meaning(frozenset({400}), True)
        if not write:
            return d, Meaning(frozenset({200, 404}), False)
        if d.method == b"DELETE":
            return d, Meaning(frozenset({200}), False, writes=1)
        if protected:
            return d, Meaning(frozenset({409}), True)
        writes = 2 if timeout is not None and timeout > 0 else 1
        return d, Meaning(frozenset({200, 201}), False, frozenset({(chain, str(network))}), writes)

    @staticmethod
    def owner(network: Network) -> int | None:
        """The index of the case whose own addresses hold `network` (modulo the number of slots), if any."""
        if network.version == 4:
            offset = int(network.network_address) - SLOT4_BASE
            return offset // 8 if 0 <= offset < SLOT4_COUNT * 8 and network.prefixlen >= 29 else None
        value = int(network.network_address)
        if value >> 80 != int(ipaddress.IPv6Address("2001:db8:1::")) >> 80 or network.prefixlen < 80:
            return None
        return (value >> 48) & 0xFFFFFFFF

    def _access(self, user: User | None, chain: str | None, write: bool) -> Meaning:
        if user is None:
            return Meaning(frozenset({401}), True)
        if not user.allowed_here:
            return Meaning(frozenset({403}), True)
        if chain is None:
            return Meaning(frozenset({200}), False)
        if chain not in self.p.chains:
            return Meaning(frozenset({403, 404}), True)
        if not user.may_use(chain) or (write and user.read_only):
            return Meaning(frozenset({403}), True)
        return Meaning(frozenset({200}), False)

    def _protected(self, network: Network) -> bool:
        return any(n.version == network.version and n.overlaps(network) for n in self.never)

    def _unique(self, rng: random.Random, index: int) -> tuple[str, str, Network]:
        """A network that belongs to this case alone: in 198.18.0.0/15, or in 2001:db8:1::/48."""
        net: Network
        if rng.random() < 0.6:
            base = SLOT4_BASE + (index % SLOT4_COUNT) * 8
            prefix = rng.choice([32, 32, 32, 31, 30, 29])
            net = ipaddress.IPv4Network((base + rng.randrange(0, 8, 1 << (32 - prefix)), prefix))
            text = str(net.network_address) if prefix == 32 and rng.random() < 0.7 else str(net)
            return "ipv4", text, net
        slot = int(ipaddress.IPv6Address(f"2001:db8:1:{(index >> 16) & 0xFFFF:x}:{index & 0xFFFF:x}::"))
        prefix = rng.choice([128, 128, 128, 112, 96, 80])
        host = rng.getrandbits(48) >> (128 - prefix) << (128 - prefix) if prefix > 80 else 0
        net = ipaddress.IPv6Network((slot | host, prefix))
        text = str(net.network_address) if prefix == 128 else str(net)
        if rng.random() < 0.2:
            text = text.upper() if rng.random() < 0.5 else (net if prefix < 128 else net.network_address).exploded
        return "ipv6", text, net

    def _shared(self, rng: random.Random) -> tuple[str, str, Network]:
        """An edge address or network of the allowed ranges, which many cases share."""
        text = rng.choice(SHARED)
        net = ipaddress.ip_network(text)
        return ("ipv6" if net.version == 6 else "ipv4"), text, net

    def _never(self, rng: random.Random) -> tuple[str, str, Network]:
        """An address in never_block, a never_block network itself, or one of the allowed ranges holding one."""
        protected = rng.choice(self.never)
        r = rng.random()
        net: Network = protected
        if r < 0.5:
            net = ipaddress.ip_network(protected.network_address + rng.randrange(protected.num_addresses))
        elif r < 0.8:
            wider = protected.supernet(new_prefix=max(protected.prefixlen - rng.randint(1, 8), 1))
            if any(wider.version == a.version and wider.subnet_of(a) for a in ALLOWED):  # type: ignore[arg-type]
                net = wider
        text = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return ("ipv6" if net.version == 6 else "ipv4"), text, net

    def _items(self, rng: random.Random, index: int) -> tuple[list[str], list[str], list[Network]]:
        """Bulk items: this case's own networks ("ok"), refused ones ("fail"), shared ones and duplicates."""
        texts: list[str] = []
        verdicts: list[str] = []
        networks: list[Network] = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.55 or not texts and r >= 0.95:
                _, text, net = self._unique(rng, index)
                texts.append(text)
                verdicts.append("ok")
                networks.append(net)
            elif r < 0.65:
                texts.append(self._never(rng)[1])
                verdicts.append("fail")
            elif r < 0.85:
                texts.append(rng.choice(INVALID_ITEM))
                verdicts.append("fail")
            elif r < 0.95:
                _, text, net = self._shared(rng)
                texts.append(text)
                verdicts.append("ok")
                networks.append(net)
            else:
                texts.append(texts[-1])  # a duplicate: "existing", or refused as the first one was
                verdicts.append("any" if verdicts[-1] == "ok" else verdicts[-1])
        return texts, verdicts, networks

    # -- helpers ----------------------------------------------------------------------------------------

    def _password(self, name: str) -> str:
        return next((u.password for u in self.p.users if u.name == name), "x")

    @staticmethod
    def _recase(rng: random.Random, data: bytes, force: bool = False, name_only: bool = False) -> bytes:
        end = data.find(b":") if name_only else len(data)
        if end < 0:
            return data
        part = bytes(c ^ 0x20 if chr(c).isalpha() and c < 0x80 and rng.random() < 0.5 else c for c in data[:end])
        if force and part == data[:end]:
            part = part.lower() if part != part.lower() else part.upper()
        return part + data[end:]

    @staticmethod
    def _percent(rng: random.Random, seg: bytes) -> bytes:
        return b"".join(b"%%%02X" % c if rng.random() < 0.4 else bytes([c]) for c in seg)

    @staticmethod
    def _escape(rng: random.Random, body: bytes) -> bytes:
        """The same JSON with some characters inside strings written as \\u escapes."""
        text = body.decode()
        out, inside, i = [], False, 0
        while i < len(text):
            c = text[i]
            if inside and c == "\\":  # an escape already: copied whole
                n = 6 if text[i + 1] == "u" else 2
                out.append(text[i:i + n])
                i += n
                continue
            if c == '"':
                inside = not inside
            elif inside and c.isascii() and c.isalnum() and rng.random() < 0.3:
                c = "\\u%04x" % ord(c)
            out.append(c)
            i += 1
        return "".join(out).encode()

    @staticmethod
    def _chunk(rng: random.Random, body: bytes) -> bytes:
        out, i = [], 0
        while i < len(body):
            n = rng.randint(1, len(body) - i)
            out.append(b"%x\r\n" % n + body[i:i + n] + b"\r\n")
            i += n
        return b"".join(out) + b"0\r\n\r\n"


# Maps any byte to visible ASCII or obs-text: a field value that is valid, if odd.
OBS_TEXT = bytes(c if c >= 0x80 or 0x21 <= c <= 0x7E else 0x61 for c in range(256))
