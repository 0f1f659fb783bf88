"""Code Shield through herd: known insecure snippets in Python, C, JavaScript and Java are found by the
layer that owns them (regex or semgrep), with their CWE and severity, and their secure versions pass;
findings equal what the codeshield package's own CodeShield.scan_code reports, except the treatment of
semgrep errors (codeshield 1.0.1 never blocks on those); a semgrep that scans nothing is refused;
code blocks of replies; `herd codeshield` exit codes and one-line errors."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from herd.cli import main
from herd.errors import HerdError

pytest.importorskip("codeshield", reason="the safety extra (codeshield, semgrep==1.75.0) is not installed")

from herd.safety.codeshield import CodeShieldScanner, code_blocks  # noqa: E402

# (language, insecure code, CWE, rule, analyzer, severity, secure version)
CASES = {
    "python-regex": ("python", "import hashlib\n\ndef digest(data):\n    return hashlib.md5(data).hexdigest()\n",
                     "CWE-328", "insecure-md5-hash-usage", "regex", "warning",
                     "import hashlib\n\ndef digest(data):\n    return hashlib.sha256(data).hexdigest()\n"),
    "python-semgrep-shell": ("python", "import subprocess\n\ndef run(cmd):\n    subprocess.run(cmd, shell=True)\n",
                             "CWE-78", "insecure-subprocess-using-shell", "semgrep", "warning",
                             "import subprocess\n\ndef run(path):\n    subprocess.run(['ls', path], check=True)\n"),
    "python-semgrep-pickle": ("python", "import pickle\n\ndef load(blob):\n    return pickle.loads(blob)\n",
                              "CWE-502", "unsafe-pickle-use", "semgrep", "warning",
                              "import json\n\ndef load(blob):\n    return json.loads(blob)\n"),
    "c-regex": ("c", '#include <stdio.h>\nint main(void) {\n    char name[32];\n    gets(name);\n    printf("%s", name);\n'
                     "    return 0;\n}\n", "CWE-242", "bugprone-gets", "regex", "error",
                '#include <stdio.h>\nint main(void) {\n    char name[32];\n    if (fgets(name, sizeof name, stdin)) '
                'printf("%s", name);\n    return 0;\n}\n'),
    "c-semgrep": ("c", '#include <stdio.h>\n#include <stdlib.h>\nint list(const char *dir) {\n    char cmd[256];\n'
                       '    snprintf(cmd, sizeof cmd, "ls %s", dir);\n    return system(cmd);\n}\n',
                  "CWE-78", "potential-command-injection", "semgrep", "warning",
                  '#include <unistd.h>\nint list(const char *dir) {\n    char *const argv[] = {"ls", (char *)dir, 0};\n'
                  '    return execv("/bin/ls", argv);\n}\n'),
    "javascript-regex": ("javascript", "async function load() {\n  const res = await fetch('http://example.com/a.json');\n"
                                       "  return res.json();\n}\n", "CWE-319", "unencrypted-fetch-usage", "regex",
                         "warning", "async function load() {\n  const res = await fetch('https://example.com/a.json');\n"
                                    "  return res.json();\n}\n"),
    "javascript-semgrep": ("javascript", "const cp = require('child_process');\nfunction list(dir) {\n"
                                         "  cp.exec('ls ' + dir, (err, out) => console.log(out));\n}\n",
                           "CWE-95", "child-process", "semgrep", "warning",
                           "const cp = require('child_process');\nfunction list(dir) {\n"
                           "  cp.execFile('ls', [dir], (err, out) => console.log(out));\n}\n"),
    "java-regex": ("java", 'import javax.crypto.Cipher;\nclass Enc {\n    Cipher make() throws Exception {\n'
                           '        return Cipher.getInstance("AES/ECB/PKCS5Padding");\n    }\n}\n',
                   "CWE-327", "deprecated-ecb-usage", "regex", "warning",
                   'import javax.crypto.Cipher;\nclass Enc {\n    Cipher make() throws Exception {\n'
                   '        return Cipher.getInstance("ChaCha20-Poly1305");\n    }\n}\n'),
    "java-regex-md5": ("java", 'import java.security.MessageDigest;\nclass H {\n    byte[] h(byte[] b) throws Exception {\n'
                               '        return MessageDigest.getInstance("MD5").digest(b);\n    }\n}\n',
                       "CWE-327", "weak-md5-hashing", "regex", "warning",
                       'import java.security.MessageDigest;\nclass H {\n    byte[] h(byte[] b) throws Exception {\n'
                       '        return MessageDigest.getInstance("SHA-256").digest(b);\n    }\n}\n'),
}


@pytest.fixture(scope="module")
def scanner() -> CodeShieldScanner:
    return CodeShieldScanner()


@pytest.mark.parametrize("case", list(CASES))
def test_insecure_snippets_found_and_secure_ones_pass(scanner, case):
    from codeshield.cs import CodeShield
    from codeshield.insecure_code_detector.languages import Language

    lang, code, cwe, rule, analyzer, severity, secure = CASES[case]
    res = scanner.scan_sync(code, lang)
    assert [(f.cwe, f.rule, f.analyzer, f.severity) for f in res.findings] == [(cwe, rule, analyzer, severity)]
    assert res.treatment == ("block" if severity == "error" else "warn")
    assert res.findings[0].line is not None and 1 <= res.findings[0].line <= code.count("\n")
    # the same findings as the codeshield package's own entry point
    ref = asyncio.run(CodeShield.scan_code(code, Language(lang)))
    assert sorted((i.cwe_id, i.pattern_id) for i in ref.issues_found) == [(cwe, rule)]
    assert ref.recommended_treatment.value == res.treatment
    clean = scanner.scan_sync(secure, lang)
    assert clean.findings == [] and clean.treatment == "ignore", clean.findings
    assert asyncio.run(CodeShield.scan_code(secure, Language(lang))).is_insecure is False


def test_semgrep_only_findings_are_really_semgrep(scanner):
    """subprocess(shell=True) and pickle.loads match no regex rule: a silent semgrep would pass them."""
    from codeshield.insecure_code_detector import insecure_patterns
    from codeshield.insecure_code_detector.analyzers import Analyzer
    from codeshield.insecure_code_detector.languages import Language
    from codeshield.insecure_code_detector.usecases import UseCase
    import re

    regexes = insecure_patterns.load(Language.PYTHON, Analyzer.REGEX, UseCase.CODESHIELD)
    for case in ("python-semgrep-shell", "python-semgrep-pickle"):
        code = CASES[case][1]
        assert not any(re.search(p.rule, code) for p in regexes)
        assert scanner.scan_sync(code, "python").findings[0].analyzer == "semgrep"


def test_java_semgrep_layer_is_reported_as_missing(scanner):
    """codeshield 1.0.1's Java semgrep rules do not load in semgrep 1.75.0 (ssrf_insecure_patterns fails to
    parse and takes the whole Java scan with it): the scanner finds that out at start-up and says so."""
    assert scanner.semgrep_broken == ["java"]
    res = scanner.scan_sync("import java.io.*;\nclass L {\n    void r(InputStream in) throws Exception {\n"
                            "        new ObjectInputStream(in);\n    }\n}\n", "java")
    assert res.findings == [] and res.notes and "java: regex rules only" in res.notes[0]
    assert scanner.scan_sync(CASES["python-regex"][1], "python").notes == []


def test_semgrep_errors_block_although_codeshield_scan_code_only_warns(scanner):
    """A semgrep rule of severity ERROR (C's none, so Java's XXE rule with the semgrep severity as codeshield
    reports it): herd normalizes "ERROR" and blocks; codeshield 1.0.1 compares "ERROR" with "error"."""
    from codeshield.cs import Treatment
    from codeshield.insecure_code_detector.issues import Issue, Severity

    from herd.safety.codeshield import _severity, treatment_of, CodeFinding

    semgrep_issue = Issue(description="xxe", cwe_id="CWE-611", severity="ERROR", pattern_id="xxe-insecure-sax-parser")
    assert semgrep_issue.severity != Severity.ERROR  # why codeshield's scan_code says WARN for it
    f = CodeFinding("CWE-611", "xxe-insecure-sax-parser", _severity(semgrep_issue.severity), "semgrep", 3, "", "java")
    assert f.severity == "error" and treatment_of([f]) == "block"
    assert Treatment.BLOCK.value == "block"


def test_unknown_language_uses_every_rule_set(scanner):
    res = scanner.scan_sync(CASES["c-regex"][1], "go")
    assert res.languages == ["all"] and [f.cwe for f in res.findings] == ["CWE-242"]
    assert scanner.scan_sync(CASES["c-regex"][1], None).treatment == "block"


def test_a_semgrep_that_scans_nothing_is_refused(monkeypatch):
    """What a semgrep newer than 1.75.0 does under codeshield 1.0.1: it runs, exits 0 and reports nothing."""
    from codeshield.insecure_code_detector import oss

    monkeypatch.setattr(oss, "SEMGREP_COMMAND", ["true"])
    with pytest.raises(HerdError, match="semgrep==1.75.0"):
        CodeShieldScanner()


def test_code_blocks():
    reply = ("Here:\n```python\nimport os\nos.system(cmd)\n```\nand\n~~~\nplain\n~~~\n"
             "   ```js title=x\nlet a = 1;\n   ```\nthen:\n```c\nint x;")
    assert code_blocks(reply) == [("python", "import os\nos.system(cmd)\n"), (None, "plain\n"), ("js", "let a = 1;\n"),
                                  ("c", "int x;")]
    assert code_blocks("no code at all") == []


def test_scan_reply(scanner):
    reply = (f"Use this:\n```python\n{CASES['python-semgrep-pickle'][1]}```\nOr in C:\n```c\n{CASES['c-regex'][1]}```\n"
             f"And text only.\n```\n{CASES['python-semgrep-shell'][1]}```\n")
    res = asyncio.run(scanner.scan_reply(reply))
    assert res.blocks == 3 and res.treatment == "block"
    assert sorted(f.cwe for f in res.findings) == ["CWE-242", "CWE-502", "CWE-78"]
    assert res.languages == ["python", "c", "all"]
    # code without a fence: the whole reply, with every language's rules
    bare = asyncio.run(scanner.scan_reply("Run this: " + CASES["python-semgrep-pickle"][1]))
    assert bare.languages == ["all"] and [f.cwe for f in bare.findings] == ["CWE-502"]
    assert asyncio.run(scanner.scan_reply("Just prose, nothing to run.")).findings == []
    assert asyncio.run(scanner.scan_reply("  ")).blocks == 0


def run(args, capsys, monkeypatch=None, stdin=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_herd_codeshield_cli(tmp_path, capsys, monkeypatch):
    bad_c, good_py, warn_py = tmp_path / "a.c", tmp_path / "ok.py", tmp_path / "w.py"
    bad_c.write_text(CASES["c-regex"][1])
    good_py.write_text(CASES["python-regex"][6])
    warn_py.write_text(CASES["python-semgrep-pickle"][1])
    assert run(["codeshield", str(good_py)], capsys)[0] == 0
    code, out, _ = run(["codeshield", str(warn_py)], capsys)
    assert code == 1 and "CWE-502 warning unsafe-pickle-use (semgrep, python)" in out and f"{warn_py}:4:" in out
    code, out, _ = run(["codeshield", "--json", str(bad_c), str(good_py)], capsys)
    assert code == 3
    first, second = (json.loads(x) for x in out.splitlines())
    assert first["treatment"] == "block" and first["findings"][0]["cwe"] == "CWE-242" and second["findings"] == []
    code, out, _ = run(["codeshield", "-", "--language", "py", "--json"], capsys, monkeypatch, CASES["python-semgrep-shell"][1])
    assert code == 1 and json.loads(out)["findings"][0]["rule"] == "insecure-subprocess-using-shell"
    md = tmp_path / "reply.md"
    md.write_text(f"Sure:\n```c\n{CASES['c-regex'][1]}```\n")
    assert run(["codeshield", "--markdown", str(md)], capsys)[0] == 3


def test_herd_codeshield_one_line_errors(tmp_path, capsys):
    go = tmp_path / "main.go"
    go.write_text("package main\n")
    for args, match in ((["codeshield", str(go)], "no rules for '.go'; pass --language NAME, or --language all"),
                        (["codeshield", "-"], "stdin has no file extension"),
                        (["codeshield", str(tmp_path / "missing.py")], "does not exist"),
                        (["codeshield", str(go), "--language", "cobol"], "no rules for language 'cobol'")):
        code, _, err = run(args, capsys)
        assert code == 2 and match in err and err.startswith("herd: error:") and err.count("\n") == 1, err
    assert run(["codeshield", str(go), "--language", "all"], capsys)[0] == 0
