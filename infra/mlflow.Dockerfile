# MLflow tracking server for infra/docker-compose.yml: Postgres backend store, S3 (MinIO) artifacts.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.*" "boto3==1.*"
