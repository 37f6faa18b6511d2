"""Delta Lake's jars: resolved once from Maven Central, cached, then used offline.

The standard route is `configure_spark_with_delta_pip`, which sets `spark.jars.packages` so Spark's Ivy
resolves `io.delta:delta-spark_<spark>_2.13:<delta>` at session start. Two things make that fragile on a
warehouse machine: Ivy contacts the repository on every start, and Ivy's default settings also read
`~/.m2`, where a half-filled Maven cache (poms without jars) makes resolution fail. So we resolve once
with our own Ivy settings (Maven Central only), keep the resolved jar files in a cache folder, and start
every later session with `spark.jars` pointing at those files: no network after the first run. If Ivy
cannot reach the repository, `mvn dependency:copy-dependencies` is tried into the same folder.

Run `python -m bertxml.platform.jars` (done by `make install`) to fill the cache; BERTXML_JARS_DIR moves it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pyspark
from delta import configure_spark_with_delta_pip
from pyspark.sql import SparkSession

log = logging.getLogger("bertxml.platform.jars")

IVY_SETTINGS = """<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers>
    <ibiblio name="central" m2compatible="true"/>
  </resolvers>
</ivysettings>
"""

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>bertxml</groupId><artifactId>delta-jars</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>io.delta</groupId><artifactId>{artifact}</artifactId><version>{version}</version></dependency>
  </dependencies>
</project>
"""


def delta_coordinates() -> tuple[str, str]:
    """(artifact, version) of the Delta jar that matches the installed delta-spark and pyspark."""
    spark_mm = ".".join(pyspark.__version__.split(".")[:2])
    return f"delta-spark_{spark_mm}_2.13", metadata.version("delta-spark")


def cache_dir() -> Path:
    artifact, version = delta_coordinates()
    root = Path(os.environ.get("BERTXML_JARS_DIR", Path.home() / ".cache" / "bertxml" / "jars"))
    return root / f"{artifact}-{version}"


def cached_jars() -> list[str]:
    """The cached jar paths, or [] when the cache is missing or incomplete."""
    folder = cache_dir()
    if not (folder / "COMPLETE").exists():
        return []
    return sorted(str(p) for p in folder.glob("*.jar"))


def _artifact(jar_name: str) -> str:
    """'org.apache.parquet_parquet-column-1.16.0.jar' or 'parquet-column-1.16.0.jar' -> 'parquet-column'."""
    org, sep, rest = jar_name.partition("_")
    base = rest if sep and "." in org else jar_name  # Ivy names its files org_artifact-version.jar
    return re.sub(r"-\d[\w.\-]*\.jar$", "", base)


def jars_not_in_spark(jars: list[str]) -> list[str]:
    """The cached jars Spark itself does not ship (Delta's own and a few small extras).

    Only these go on the driver's class path: the transitive copies of Jackson, Hadoop or Parquet that
    Ivy also resolves would shadow Spark's own, newer ones there.
    """
    shipped = {_artifact(p.name) for p in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    return [j for j in jars if _artifact(Path(j).name) not in shipped]


def _resolve_with_ivy(folder: Path) -> None:
    """Start a throw-away local session with spark.jars.packages so Spark's own Ivy downloads the jars."""
    ivy_home = folder.parent / "ivy"
    settings = ivy_home / "ivysettings.xml"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(IVY_SETTINGS)
    builder = (SparkSession.builder.master("local[1]").appName("bertxml-fetch-jars")
               .config("spark.jars.ivy", str(ivy_home))
               .config("spark.jars.ivySettings", str(settings))
               .config("spark.ui.enabled", "false"))
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    spark.stop()
    jars = list((ivy_home / "jars").glob("*.jar"))
    if not any("delta-spark" in j.name for j in jars):
        raise RuntimeError(f"Ivy finished but left no delta-spark jar in {ivy_home / 'jars'}")
    for jar in jars:
        shutil.copy2(jar, folder / jar.name)


def _resolve_with_mvn(folder: Path) -> None:
    artifact, version = delta_coordinates()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pom.xml").write_text(POM.format(artifact=artifact, version=version))
        subprocess.run(["mvn", "-q", "-B", "dependency:copy-dependencies",
                        f"-DoutputDirectory={folder}"], cwd=tmp, check=True)


def ensure_delta_jars() -> list[str]:
    """Return local paths of Delta's jars, resolving them into the cache on first use."""
    jars = cached_jars()
    if jars:
        return jars
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    artifact, version = delta_coordinates()
    log.info("resolving io.delta:%s:%s from Maven Central into %s", artifact, version, folder)
    errors = []
    for name, resolve in (("ivy", _resolve_with_ivy), ("mvn", _resolve_with_mvn)):
        try:
            resolve(folder)
            (folder / "COMPLETE").write_text(f"io.delta:{artifact}:{version} via {name}\n")
            return cached_jars()
        except Exception as exc:  # noqa: BLE001 - report every route's failure together
            errors.append(f"{name}: {exc}")
            log.warning("could not resolve Delta jars with %s: %s", name, exc)
    raise RuntimeError(
        f"Delta Lake jars io.delta:{artifact}:{version} could not be resolved from Maven Central "
        f"(tried Ivy and mvn): {'; '.join(errors)}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    jars = ensure_delta_jars()
    print(f"{len(jars)} Delta Lake jars cached in {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
