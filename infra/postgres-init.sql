-- Run once by the postgres image on an empty volume: MLflow's database beside Prefect's.
CREATE DATABASE mlflow OWNER edgeopt;
