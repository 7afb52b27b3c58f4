# A slim image running the gateway as a non-root user.
#   docker build -t realtime-gateway .
#   docker run -p 8000:8000 -e REALTIME_AUTH__HMAC_SECRET=... -e REALTIME_API__KEY=... \
#              -e REALTIME_API__HOST=0.0.0.0 -p 8001:8001 realtime-gateway
# The server API binds to loopback unless REALTIME_API__HOST says otherwise: publish its
# port only on a private network.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY realtime ./realtime
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY config /etc/realtime
RUN useradd --system --uid 10001 --no-create-home realtime
USER realtime
ENV REALTIME_CONFIG=/etc/realtime/gateway.toml \
    PYTHONUNBUFFERED=1
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["realtime", "serve"]
