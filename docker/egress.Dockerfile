# The compose stack's egress proxy: Debian's Squid with the policy rendered
# from config/squid.conf.template (scripts/egress-config.sh), which allows
# CONNECT to the hosts of allowedApis on 443 and nothing else. Unlike the
# node's image, its build needs apt's network.

ARG BASE_IMAGE=debian:12.8-slim

FROM ${BASE_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends squid=5.7-2+deb12u6 \
    && rm -rf /var/lib/apt/lists/*

COPY config/squid.compose.conf /etc/squid/squid.conf

# Debian's `proxy` account (13:13), which Squid runs as; its pid file and
# logs go to a tmpfs.
USER 13:13
EXPOSE 3128
ENTRYPOINT ["squid", "-N", "-f", "/etc/squid/squid.conf"]
