"""Airflow DAG: score last night's notes, then the AUC report of the night a week earlier.

Copy this file into the Airflow dags folder on a machine where bertxml is installed (a venv at
/srv/bertxml/.venv here: change BERTXML). `--conf prod` is bertxml/conf/prod.yaml as shipped in the
installed package. Each task is retried: a late notes feed fails `score` with exit 1 (NoNotesError) and a
retry picks it up; a bad command exits 2. `tests/test_deploy.py` parses every command below with
bertxml's own argument parser.
"""
from datetime import timedelta

import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator  # Airflow 3: airflow.providers.standard.operators.bash

BERTXML = "/srv/bertxml/.venv/bin/bertxml {job} --workdir /data/warehouse --conf prod"

with DAG(
    dag_id="bertxml_nightly",
    schedule="30 2 * * *",                      # UTC: ds is yesterday's date
    start_date=pendulum.datetime(2025, 6, 1, tz="UTC"),
    catchup=False,                              # missed nights: `bertxml score --since-last`
    max_active_runs=1,
    default_args={"retries": 4, "retry_delay": timedelta(minutes=30), "retry_exponential_backoff": True,
                  "execution_timeout": timedelta(hours=4)},
) as dag:
    score = BashOperator(task_id="score", bash_command=BERTXML.format(job="score") + " --date {{ ds }}")
    # a week later most of a night's notes have their diagnoses coded: its AUCs are then meaningful
    evaluate = BashOperator(task_id="evaluate", bash_command=BERTXML.format(job="evaluate")
                            + " --date {{ macros.ds_add(ds, -7) }}")
    score >> evaluate
