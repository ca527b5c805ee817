"""The software the lab runs: PostgreSQL's binaries, Java, keytool, ActiveMQ; how to install it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from scenarios.lab.errors import LabError

ACTIVEMQ_JAR = Path("/usr/share/activemq/bin/activemq.jar")
ACTIVEMQ_HOME = Path("/usr/share/activemq")


def _install_hint(package: str) -> str:
    if os.geteuid() == 0:
        return f"apt-get install -y {package}"
    return f"sudo apt-get install -y {package}"


def postgres_bindir() -> Path:
    """The directory holding ``postgres`` and ``initdb`` (TWOPC_PG_BINDIR overrides)."""
    override = os.environ.get("TWOPC_PG_BINDIR")
    candidates = [Path(override)] if override else _installed_pg_bindirs()
    for directory in candidates:
        if (directory / "postgres").exists() and (directory / "initdb").exists():
            return directory
    raise LabError(
        "PostgreSQL server binaries (postgres, initdb) not found"
        + (f" in TWOPC_PG_BINDIR={override}" if override else "")
        + f". Install them with: {_install_hint('postgresql')}"
    )


def _installed_pg_bindirs() -> list[Path]:
    """Debian's versioned bin directories, newest first, then whatever PATH has."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    candidates = [Path(v) for v in versions]
    found = shutil.which("postgres")
    if found:
        candidates.append(Path(found).resolve().parent)
    return candidates


def java_binary() -> str:
    java = shutil.which("java")
    if java is None:
        raise LabError(
            f"Java is not installed (ActiveMQ needs it). Install it with: "
            f"{_install_hint('default-jre-headless')}"
        )
    return java


def keytool_binary() -> str:
    """The JDK's keytool: next to the java that runs the broker, else on PATH."""
    beside = Path(java_binary()).resolve().parent / "keytool"
    if beside.exists():
        return str(beside)
    found = shutil.which("keytool")
    if found is None:
        raise LabError(
            "keytool (the JDK's key tool, which makes the broker's TLS certificate) is not "
            f"installed. Install it with: {_install_hint('default-jre-headless')}"
        )
    return found


def make_self_signed(keystore: Path, certificate: Path, password: str, *, name: str) -> None:
    """A key and self-signed certificate for 127.0.0.1/localhost in a PKCS12 ``keystore``,
    and the certificate in PEM at ``certificate``; made with keytool."""
    keytool = keytool_binary()
    keystore.unlink(missing_ok=True)
    env = {**os.environ, "TWOPC_KEYSTORE_PASSWORD": password}  # not on the command line
    common = ["-keystore", str(keystore), "-storetype", "PKCS12", "-alias", "broker"]
    common += ["-storepass:env", "TWOPC_KEYSTORE_PASSWORD"]
    steps = [
        [
            keytool,
            "-genkeypair",
            *common,
            "-keypass:env",
            "TWOPC_KEYSTORE_PASSWORD",
            "-keyalg",
            "EC",
            "-groupname",
            "secp256r1",
            "-validity",
            "3650",
            "-dname",
            f"CN={name}",
            "-ext",
            "SAN=IP:127.0.0.1,DNS:localhost",
            "-noprompt",
        ],
        [keytool, "-exportcert", "-rfc", *common, "-file", str(certificate)],
    ]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise LabError(
                f"keytool could not make the broker's TLS key and certificate "
                f"({keystore}): {(result.stdout + result.stderr).strip()}"
            )
    os.chmod(keystore, 0o600)


def activemq_jar() -> Path:
    jar = Path(os.environ.get("TWOPC_ACTIVEMQ_JAR") or ACTIVEMQ_JAR)
    if not jar.exists():
        raise LabError(
            f"ActiveMQ is not installed ({jar} is missing). Install it with: "
            f"{_install_hint('activemq')} (or set TWOPC_ACTIVEMQ_JAR)"
        )
    return jar
