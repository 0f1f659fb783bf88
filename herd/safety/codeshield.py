"""Code Shield: Meta's insecure-code scanner (the `codeshield` package, MIT) behind one small interface.

Code Shield (PurpleLlama `CodeShield/`) runs two layers per language: regex rules, then, when no
regex matched and a cheap prescan regex says a rule may apply, semgrep rules; each finding carries
a CWE id, a rule id and a severity. herd calls its detector (`insecure_code_detector.analyze` with
the CODESHIELD use case) directly rather than `CodeShield.scan_code`, for two reasons found in
codeshield 1.0.1:

- `scan_code` catches every exception and returns "not insecure": a broken semgrep would pass
  everything silently. Here failures propagate.
- semgrep findings carry their severity as semgrep's upper-case string ("ERROR"), which
  `scan_code` compares with the enum `Severity.ERROR` ("error"), so a semgrep error never becomes
  BLOCK. Here severities are normalized to "error" / "warning" / "advice" before the treatment is
  chosen: block if any finding is an error, warn if there are findings, else ignore (Code Shield's
  recommended_treatment rule).

The semgrep layer needs `semgrep==1.75.0`: codeshield 1.0.1 always passes `--project-root /`, and
newer semgrep then scans no file at all and reports nothing, without an error. So every scanner
proves its semgrep layer once when it is built, with one snippet per language that only a semgrep
rule catches (Python `pickle.loads`, C `system(cmd)`, JavaScript `eval(expr)`, Java
`new ObjectInputStream(in)`), and refuses to run if the Python probe finds nothing. A language
whose probe finds nothing keeps its regex layer and every result in it says so in `notes`: with
codeshield 1.0.1 and semgrep 1.75.0 that is Java, whose rule file holds one rule
(ssrf_insecure_patterns) that semgrep cannot parse, which fails the whole Java scan. Install both
with the extra: `pip install 'herd[safety]'`.

Languages: Code Shield's (c, cpp, csharp, hack, java, javascript, kotlin, objective_c, php,
python, ruby, rust, swift, xml) under their usual names and file extensions. Code in a language
it does not know, or of unknown language (an untagged code block), is scanned with the rules of
every language Code Shield supports when no language is given (its own default), never skipped.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from herd.errors import HerdError

EXTRA = "pip install 'herd[safety]'  (codeshield==1.0.1 with semgrep==1.75.0)"

LANGUAGE_ALIASES: dict[str, str] = {
    "python": "python", "py": "python", "python3": "python", "py3": "python",
    "c": "c", "h": "c",
    "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp", "hh": "cpp",
    "csharp": "csharp", "c#": "csharp", "cs": "csharp",
    "java": "java",
    "javascript": "javascript", "js": "javascript", "node": "javascript", "nodejs": "javascript", "jsx": "javascript",
    "mjs": "javascript", "cjs": "javascript",
    "php": "php", "hack": "hack", "hh.php": "hack",
    "kotlin": "kotlin", "kt": "kotlin", "kts": "kotlin",
    "objective_c": "objective_c", "objective-c": "objective_c", "objc": "objective_c", "m": "objective_c",
    "objectivec": "objective_c",
    "ruby": "ruby", "rb": "ruby",
    "rust": "rust", "rs": "rust",
    "swift": "swift",
    "xml": "xml",
}
"""Names, code-fence tags and file extensions -> Code Shield's language names."""

Treatment = Literal["block", "warn", "ignore"]


SEMGREP_PROBES: dict[str, tuple[str, str]] = {
    "python": ("import pickle\n\ndef load(data):\n    return pickle.loads(data)\n", "CWE-502"),
    "c": ("#include <stdlib.h>\nint run(const char *cmd) {\n    return system(cmd);\n}\n", "CWE-78"),
    "javascript": ("function calc(expr) {\n  return eval(expr);\n}\n", "CWE-95"),
    "java": ("import java.io.*;\nclass Load {\n    void read(InputStream in) throws Exception {\n"
             "        new ObjectInputStream(in);\n    }\n}\n", "CWE-502"),
}
"""Per language: code that only a semgrep rule flags, and the CWE it must report (the start-up probe)."""


def language_of(name: str | None) -> str | None:
    """Code Shield's name for a language name, fence tag or file extension; None when it has no rules for it."""
    if not name:
        return None
    return LANGUAGE_ALIASES.get(name.strip().lower().lstrip("."))


def language_of_path(path: Path) -> str | None:
    return language_of(path.suffix)


@dataclass
class CodeFinding:
    """One insecure pattern Code Shield found."""

    cwe: str
    """CWE id, e.g. "CWE-78"."""
    rule: str
    """Code Shield's rule id (regex pattern_id, or the semgrep rule's id)."""
    severity: str
    """error, warning or advice."""
    analyzer: str
    """regex or semgrep."""
    line: int | None
    """1-based line in the scanned code."""
    description: str
    language: str
    """The rules' language."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanResult:
    """Everything Code Shield found in one piece of code (or one reply's code blocks)."""

    findings: list[CodeFinding] = field(default_factory=list)
    treatment: Treatment = "ignore"
    """block (an error-severity finding), warn (findings), ignore (none): Code Shield's recommendation."""
    seconds: float = 0.0
    languages: list[str] = field(default_factory=list)
    """The rule sets used ("all" for code of unknown language)."""
    blocks: int = 0
    """Pieces scanned: scan_reply's code blocks (a reply without a fenced block is one piece)."""
    notes: list[str] = field(default_factory=list)
    """What was not checked, e.g. a language whose semgrep layer does not work here."""

    @property
    def insecure(self) -> bool:
        return bool(self.findings)

    @property
    def cwes(self) -> list[str]:
        return sorted({f.cwe for f in self.findings if f.cwe})

    def to_dict(self) -> dict[str, Any]:
        return {"insecure": self.insecure, "treatment": self.treatment,
                "findings": [f.to_dict() for f in self.findings], "languages": self.languages,
                "code_blocks": self.blocks, "seconds": round(self.seconds, 4),
                **({"notes": self.notes} if self.notes else {})}


_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.DOTALL | re.MULTILINE)
_OPEN_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*\n(.*)\Z", re.DOTALL | re.MULTILINE)


def code_blocks(text: str) -> list[tuple[str | None, str]]:
    """(fence tag or None, code) of each fenced code block (``` or ~~~) in markdown text, in order.

    A block left open at the end (a reply cut by max_tokens) counts too, so truncation cannot hide code."""
    out: list[tuple[str | None, str]] = []
    end = 0
    for m in _FENCE.finditer(text):
        out.append((m.group(2) or None, m.group(3)))
        end = m.end()
    tail = _OPEN_FENCE.search(text, end)
    if tail:
        out.append((tail.group(2) or None, tail.group(3)))
    return out


def _severity(value: Any) -> str:
    text = str(getattr(value, "value", value)).lower()
    return text if text in ("error", "warning", "advice", "disabled") else "warning"


def treatment_of(findings: list[CodeFinding]) -> Treatment:
    if any(f.severity == "error" for f in findings):
        return "block"
    return "warn" if findings else "ignore"


class CodeShieldScanner:
    """Scan code with Code Shield. Building one checks the install and proves the semgrep layer works
    (HerdError naming the fix otherwise); `check=False` skips that proof (tests of the error path)."""

    def __init__(self, check: bool = True):
        try:
            from codeshield.insecure_code_detector import insecure_code_detector as icd
            from codeshield.insecure_code_detector.languages import Language, get_supported_languages
            from codeshield.insecure_code_detector.usecases import UseCase
        except ImportError as e:
            raise HerdError(f"Code Shield is not installed ({e}); install the safety extra: {EXTRA}.") from None
        except Exception as e:  # codeshield looks for semgrep-core when imported
            raise HerdError(f"Code Shield cannot start ({e}); install the safety extra: {EXTRA}.") from None
        self._icd, self._Language, self._usecase = icd, Language, UseCase.CODESHIELD
        self.supported = [lang.value for lang in get_supported_languages()]
        self.semgrep_broken: list[str] = []
        if check:
            self.self_check()

    def self_check(self) -> None:
        """Probe each language's semgrep layer; HerdError if Python's finds nothing (a semgrep newer than
        1.75.0 scans nothing), a note on the results of any other language whose layer is broken."""
        async def probe_all() -> list[ScanResult]:
            return list(await asyncio.gather(*(self.scan(code, lang) for lang, (code, _) in SEMGREP_PROBES.items())))

        if _in_loop():  # called inside a running event loop: probe on a fresh one
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                results = pool.submit(asyncio.run, probe_all()).result()
        else:
            results = asyncio.run(probe_all())
        works = {lang: any(f.analyzer == "semgrep" and f.cwe == cwe for f in res.findings)
                 for (lang, (_, cwe)), res in zip(SEMGREP_PROBES.items(), results)}
        self.semgrep_broken = sorted(lang for lang, ok in works.items() if not ok)
        if not works["python"]:
            from importlib.metadata import PackageNotFoundError, version

            try:
                semgrep = version("semgrep")
            except PackageNotFoundError:
                semgrep = "not installed"
            raise HerdError(f"Code Shield's semgrep layer found nothing in a known-insecure probe (semgrep "
                            f"{semgrep}; codeshield 1.0.1 needs semgrep==1.75.0, newer ones scan nothing); "
                            "run: pip install semgrep==1.75.0.")

    async def scan(self, code: str, language: str | None = None, before: str | None = None) -> ScanResult:
        """Scan one piece of code. language: a name, tag or extension; None or an unsupported one: every
        language's rules (Code Shield's default). before: code that precedes it (a completion's prompt):
        semgrep sees the whole file, but only findings in `code` count (CyberSecEval's code_before)."""
        start = time.perf_counter()
        lang = language_of(language)
        langs = [lang] if lang else list(self.supported)
        found = await asyncio.gather(*(self._icd.analyze(self._Language(x), code, code_before=before,
                                                         usecase=self._usecase) for x in langs))
        findings: list[CodeFinding] = []
        seen: set[tuple] = set()
        for x, issues in zip(langs, found):
            for issue in issues or []:
                analyzer = str(getattr(issue.analyzer, "value", issue.analyzer) or "")
                f = CodeFinding(cwe=str(issue.cwe_id or ""), rule=str(issue.pattern_id or issue.name or ""),
                                severity=_severity(issue.severity), analyzer=analyzer, line=issue.line,
                                description=str(issue.description or "").strip(), language=x)
                key = (f.cwe, f.rule, f.line)  # C rules also run for C++: report a finding once
                if key not in seen:
                    seen.add(key)
                    findings.append(f)
        findings.sort(key=lambda f: (f.line or 0, f.cwe, f.rule))
        notes = [f"{x}: regex rules only (the semgrep layer found nothing in its probe at start-up)"
                 for x in langs if x in self.semgrep_broken]
        return ScanResult(findings, treatment_of(findings), time.perf_counter() - start,
                          [lang] if lang else ["all"], 1, notes)

    async def scan_reply(self, text: str) -> ScanResult:
        """Scan a model's reply: each fenced code block with its tag's language, or, when the reply has no
        fenced block, the whole reply with every language's rules (as llama-stack's Code Shield shield scans
        a message), so code written without a fence is not skipped."""
        start = time.perf_counter()
        blocks = [(tag, code) for tag, code in code_blocks(text) if code.strip()]
        if not blocks and text.strip():
            blocks = [(None, text)]
        results = await asyncio.gather(*(self.scan(code, tag) for tag, code in blocks))
        findings = [f for r in results for f in r.findings]
        langs = list(dict.fromkeys(x for r in results for x in r.languages))
        notes = list(dict.fromkeys(n for r in results for n in r.notes))
        return ScanResult(findings, treatment_of(findings), time.perf_counter() - start, langs, len(results), notes)

    def scan_sync(self, code: str, language: str | None = None, before: str | None = None) -> ScanResult:
        """scan() for callers without an event loop."""
        return asyncio.run(self.scan(code, language, before))

    def rule_cwes(self, languages: list[str]) -> list[str]:
        """Every CWE id Code Shield's rules for `languages` can report (regex and semgrep), sorted."""
        import json

        from codeshield.insecure_code_detector import insecure_patterns, oss
        from codeshield.insecure_code_detector.analyzers import Analyzer

        cwes: set[str] = set()
        for lang in languages:
            for p in insecure_patterns.load(self._Language(lang), Analyzer.REGEX, self._usecase):
                cwes.add(p.cwe_id)
            rules = oss.SEMGREP_RULE_REPO_PATH / "_generated_" / f"{lang}_{self._usecase.value}.json"
            if rules.is_file():
                for rule in json.loads(rules.read_text()).get("rules", []):
                    cwes.add((rule.get("metadata") or {}).get("cwe_id") or "")
        return sorted((c for c in cwes if c), key=lambda c: (len(c), c))


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
