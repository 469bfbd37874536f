"""JUnit XML (the dialect GitHub, GitLab and Jenkins read): suites of test cases, a case
passes, fails (new finding), errs (infrastructure) or is skipped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    name: str
    classname: str
    time_s: float = 0.0
    failure: tuple[str, str] | None = None  # (message, body): a new finding
    error: tuple[str, str] | None = None  # (message, body): infrastructure, never a finding
    skipped: str | None = None
    stdout: str = ""
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    cases: list[Case] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)


def _clean(text: str) -> str:
    # XML 1.0 cannot carry most control characters (a guest's serial log may have them)
    return "".join(ch if ch in "\t\n\r" or ord(ch) >= 0x20 else f"\\x{ord(ch):02x}" for ch in text)


def to_xml(suites: list[Suite], name: str = "hil ci") -> ET.Element:
    root = ET.Element("testsuites", name=name)
    totals: dict[str, int] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for suite in suites:
        counts = {
            "tests": len(suite.cases),
            "failures": sum(1 for c in suite.cases if c.failure),
            "errors": sum(1 for c in suite.cases if c.error),
            "skipped": sum(1 for c in suite.cases if c.skipped is not None),
        }
        t = sum(c.time_s for c in suite.cases)
        attrs = {"name": suite.name, "time": f"{t:.3f}", **{k: str(v) for k, v in counts.items()}}
        s = ET.SubElement(root, "testsuite", attrs)
        if suite.properties:
            props = ET.SubElement(s, "properties")
            for k, v in suite.properties.items():
                ET.SubElement(props, "property", name=k, value=_clean(v))
        for c in suite.cases:
            e = ET.SubElement(s, "testcase", name=c.name, classname=c.classname, time=f"{c.time_s:.3f}")
            if c.properties:
                props = ET.SubElement(e, "properties")
                for k, v in c.properties.items():
                    ET.SubElement(props, "property", name=k, value=_clean(v))
            if c.failure:
                f = ET.SubElement(e, "failure", message=_clean(c.failure[0]), type="new-finding")
                f.text = _clean(c.failure[1])
            if c.error:
                f = ET.SubElement(e, "error", message=_clean(c.error[0]), type="infrastructure")
                f.text = _clean(c.error[1])
            if c.skipped is not None:
                ET.SubElement(e, "skipped", message=_clean(c.skipped))
            if c.stdout:
                ET.SubElement(e, "system-out").text = _clean(c.stdout)
        for k in totals:
            totals[k] += counts[k]
        total_time += t
    for k, total in totals.items():
        root.set(k, str(total))
    root.set("time", f"{total_time:.3f}")
    return root


def write(path: Path, suites: list[Suite], name: str = "hil ci") -> None:
    tree = ET.ElementTree(to_xml(suites, name))
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)
