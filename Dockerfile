FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY services services
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home kairos
USER 10001
ENV PYTHONUNBUFFERED=1
CMD ["python", "-m", "gateway"]
