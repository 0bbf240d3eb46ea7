# One image runs any Hifi service: `docker run hifi collector`, `... sender --sink webhook`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home hifi
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER hifi
WORKDIR /home/hifi
ENV HIFI_DATA_DIR=/home/hifi/var \
    HIFI_WEB_HOST=0.0.0.0 \
    HIFI_CONFIG=/etc/hifi/hifi.yaml \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["hifi", "run"]
CMD ["collector"]
