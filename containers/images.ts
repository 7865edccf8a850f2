// What goes into the Stratus container images: the single source that the builder (build.ts) and the Dockerfiles'
// equivalence test (dockerfiles.unit.test.ts) both read. Pure data, no I/O.

/** Debian release and archive the root filesystems come from (the same as the project's machines: Debian 12). */
export const DEBIAN = {
  suite: 'bookworm',
  /** Base image of the Dockerfiles: the same release. */
  dockerBase: 'debian:bookworm-slim',
  /** apt sources, one-line format; the mirror can be replaced with STRATUS_DEBIAN_MIRROR / STRATUS_DEBIAN_SECURITY. */
  sources: (mirror: string, security: string): string[] => [
    `deb ${mirror} bookworm main`,
    `deb ${mirror} bookworm-updates main`,
    `deb ${security} bookworm-security main`,
  ],
  defaultMirror: 'http://deb.debian.org/debian',
  defaultSecurity: 'http://deb.debian.org/debian-security',
} as const;

/** dpkg path filters: no documentation (except the copyright files), manuals, translations. */
export const DPKG_EXCLUDES = [
  'path-exclude=/usr/share/doc/*',
  'path-include=/usr/share/doc/*/copyright',
  'path-exclude=/usr/share/man/*',
  'path-exclude=/usr/share/info/*',
  'path-exclude=/usr/share/locale/*',
  'path-include=/usr/share/locale/locale.alias',
  'path-exclude=/usr/share/lintian/*',
] as const;

/** Where the app and Node live inside both images. */
export const APP_DIR = '/opt/stratus';
export const NODE_PATH = '/usr/local/bin/node';
/** Files of the repository copied to APP_DIR (tests excluded), and the production node_modules. */
export const APP_PATHS = ['package.json', 'crds', 'operator/src', 'node-agent/src'] as const;
export const APP_EXCLUDE = /\.test\.ts$/;

/** The non-root user of the operator (distroless' "nonroot"). */
export const NONROOT = { uid: 65532, gid: 65532, name: 'nonroot' } as const;

export type ImageName = 'operator' | 'agent';

export interface ImageDef {
  name: ImageName;
  /** Repository without the registry: stratus-operator, stratus-agent. */
  repository: string;
  /** mmdebstrap variant: `extract` unpacks the packages and runs no maintainer script (no shell, no apt, no dpkg
   * in the image); `essential` installs Debian's essential set (a shell, coreutils, dpkg) plus the packages. */
  variant: 'extract' | 'essential';
  /** Debian packages (their dependencies come with them; no recommends). */
  packages: readonly string[];
  /** OCI config. */
  user: string;
  entrypoint: readonly string[];
  env: readonly string[];
  workingDir: string;
  description: string;
}

const ENV = ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'NODE_ENV=production'] as const;

export const IMAGES: Record<ImageName, ImageDef> = {
  operator: {
    name: 'operator',
    repository: 'stratus-operator',
    variant: 'extract',
    // What the Node binary links against (libc6 carries libm, libdl, libpthread), CA certificates, os-release,
    // /etc/services and /etc/protocols, time zones.
    packages: ['base-files', 'ca-certificates', 'libc6', 'libgcc-s1', 'libstdc++6', 'netbase', 'tzdata'],
    user: `${NONROOT.uid}:${NONROOT.gid}`,
    entrypoint: [NODE_PATH, `${APP_DIR}/operator/src/main.ts`],
    env: [...ENV],
    workingDir: APP_DIR,
    description: 'Stratus operator: controllers, scheduler, IPAM for the Stratus IaaS custom resources',
  },
  agent: {
    name: 'agent',
    repository: 'stratus-agent',
    variant: 'essential',
    // Everything the node agent runs (grep execFile/spawn/exec.run in node-agent/src): qemu-system-x86_64
    // (+ its firmware: seabios, ipxe-qemu, qemu-system-data), qemu-img, ip/bridge, nft, dnsmasq, ovs-vsctl,
    // genisoimage, nsenter, sysctl, conntrack, ethtool, cp (coreutils, essential). systemd-run/systemctl run on the
    // host through nsenter, never from the image.
    packages: [
      'ca-certificates',
      'ceph-common',
      'conntrack',
      'dnsmasq-base',
      'ethtool',
      'genisoimage',
      'iproute2',
      'ipxe-qemu',
      'libstdc++6',
      'nftables',
      'openvswitch-switch',
      'procps',
      'qemu-block-extra',
      'qemu-system-data',
      'qemu-system-x86',
      'qemu-utils',
      'seabios',
      'util-linux',
    ],
    user: '0:0',
    entrypoint: [NODE_PATH, `${APP_DIR}/node-agent/src/main.ts`],
    env: [...ENV],
    workingDir: APP_DIR,
    description: 'Stratus node agent: runs QEMU guests and wires their networks on a hypervisor node',
  },
};

/** The test node's sandbox image: a static pause (containers/pause/pause.c). */
export const PAUSE = { ref: 'stratus.local/pause:1', entrypoint: ['/pause'] as readonly string[] } as const;

export const REGISTRY = 'stratus.local';

export function imageRef(def: ImageDef, tag: string): string {
  return `${REGISTRY}/${def.repository}:${tag}`;
}
