// Test helper: writes a NoCloud seed ISO (volume id `cidata`: user-data, meta-data, optional network-config) with
// genisoimage, deterministically. genisoimage stamps the volume descriptors, the directory records and the Rock Ridge
// TF entries (including ctime, which cannot be set from outside) with the clock, so every timestamp is rewritten
// afterwards to SEED_DATE; ownership and modes are fixed with -uid/-gid/-file-mode/-dir-mode.
// The node agent has its own seed writer; this one is for tests of the guest image.
import { mkdir, mkdtemp, open, rm, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { run } from '../controlplane/util.ts';

export interface SeedOptions {
  instanceId: string;
  hostname: string;
  /** `#!...` script or `#cloud-config` document. */
  userData?: string;
  /** netplan v2 YAML (the subset the guest supports: see guest/init). */
  networkConfig?: string;
  /** Extra meta-data lines (`key: value`). */
  metaData?: Record<string, string>;
}

/** 2024-01-01T00:00:00Z, written into every timestamp of the ISO. */
export const SEED_DATE = new Date(Date.UTC(2024, 0, 1));

/** netplan v2 for one NIC matched by MAC with a static address and a default route. */
export function staticNetworkConfig(opts: {
  mac: string;
  name?: string;
  address: string;
  gateway?: string;
  nameservers?: string[];
  mtu?: number;
}): string {
  const lines = [
    'version: 2',
    'ethernets:',
    '  nic0:',
    '    match:',
    `      macaddress: "${opts.mac.toLowerCase()}"`,
    `    set-name: ${opts.name ?? 'eth0'}`,
  ];
  if (opts.mtu) lines.push(`    mtu: ${opts.mtu}`);
  lines.push('    addresses:', `      - ${opts.address}`);
  if (opts.gateway) lines.push('    routes:', '      - to: 0.0.0.0/0', `        via: ${opts.gateway}`);
  if (opts.nameservers?.length) lines.push('    nameservers:', `      addresses: [${opts.nameservers.join(', ')}]`);
  return `${lines.join('\n')}\n`;
}

/** Writes the seed ISO to `file`. Same options -> byte-identical ISO. */
export async function writeSeedIso(file: string, opts: SeedOptions): Promise<void> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stratus-seed-'));
  try {
    const files = path.join(dir, 'cidata');
    await mkdir(files);
    const meta = [`instance-id: ${opts.instanceId}`, `local-hostname: ${opts.hostname}`];
    for (const [k, v] of Object.entries(opts.metaData ?? {})) meta.push(`${k}: ${v}`);
    const contents: [string, string][] = [
      ['meta-data', `${meta.join('\n')}\n`],
      ['user-data', opts.userData ?? ''],
    ];
    if (opts.networkConfig !== undefined) contents.push(['network-config', opts.networkConfig]);
    for (const [name, data] of contents) {
      await writeFile(path.join(files, name), data, { mode: 0o644 });
      await utimes(path.join(files, name), SEED_DATE, SEED_DATE);
    }
    await utimes(files, SEED_DATE, SEED_DATE);
    await run('genisoimage', [
      '-quiet',
      '-output',
      file,
      '-volid',
      'cidata',
      '-joliet',
      '-rock',
      '-input-charset',
      'utf-8',
      '-uid',
      '0',
      '-gid',
      '0',
      '-file-mode',
      '0444',
      '-dir-mode',
      '0555',
      files,
    ]);
    await normalizeIsoTimestamps(file, SEED_DATE);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const SECTOR = 2048;

function shortDate(d: Date): Buffer {
  return Buffer.from([
    d.getUTCFullYear() - 1900,
    d.getUTCMonth() + 1,
    d.getUTCDate(),
    d.getUTCHours(),
    d.getUTCMinutes(),
    d.getUTCSeconds(),
    0,
  ]);
}

function longDate(d: Date): Buffer {
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  const s = `${p(d.getUTCFullYear(), 4)}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}`;
  return Buffer.concat([
    Buffer.from(`${s}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}00`, 'ascii'),
    Buffer.from([0]),
  ]);
}

/**
 * Rewrites every timestamp in an ISO9660 image (with Rock Ridge and Joliet) to `date`: the volume descriptors'
 * creation/modification/effective dates, each directory record's date, and Rock Ridge TF entries (also those reached
 * through CE continuation areas). Works in place on the whole image held in memory (seed ISOs are tiny).
 */
export async function normalizeIsoTimestamps(file: string, date: Date): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const iso = await fh.readFile();
    const short = shortDate(date);
    const long = longDate(date);
    const seen = new Set<number>();

    const patchSystemUse = (start: number, end: number) => {
      let p = start;
      while (p + 4 <= end) {
        const sig = iso.toString('latin1', p, p + 2);
        const len = iso[p + 2]!;
        if (len < 4 || p + len > end) break;
        if (sig === 'TF') {
          const flags = iso[p + 4]!;
          const stamp = flags & 0x80 ? long : short;
          let q = p + 5;
          for (let bit = 0; bit < 7; bit++) {
            if (!(flags & (1 << bit))) continue;
            if (q + stamp.length <= p + len) stamp.copy(iso, q);
            q += stamp.length;
          }
        } else if (sig === 'CE') {
          const block = iso.readUInt32LE(p + 4);
          const offset = iso.readUInt32LE(p + 12);
          const length = iso.readUInt32LE(p + 20);
          const at = block * SECTOR + offset;
          if (at + length <= iso.length) patchSystemUse(at, at + length);
        } else if (sig === 'ST') {
          break;
        }
        p += len;
      }
    };

    const walkDir = (lba: number, size: number, rockRidge: boolean) => {
      if (seen.has(lba)) return;
      seen.add(lba);
      const start = lba * SECTOR;
      const end = Math.min(start + size, iso.length);
      let p = start;
      while (p < end) {
        const len = iso[p]!;
        if (len === 0) {
          p = start + (Math.floor((p - start) / SECTOR) + 1) * SECTOR;
          continue;
        }
        short.copy(iso, p + 18);
        const nameLen = iso[p + 32]!;
        const isDot = nameLen === 1 && (iso[p + 33] === 0 || iso[p + 33] === 1);
        if (rockRidge) {
          const su = p + 33 + nameLen + (nameLen % 2 === 0 ? 1 : 0);
          patchSystemUse(su, p + len);
        }
        if (iso[p + 25]! & 0x02 && !isDot) walkDir(iso.readUInt32LE(p + 2), iso.readUInt32LE(p + 10), rockRidge);
        p += len;
      }
    };

    for (let sector = 16; (sector + 1) * SECTOR <= iso.length; sector++) {
      const vd = sector * SECTOR;
      const type = iso[vd]!;
      if (iso.toString('latin1', vd + 1, vd + 6) !== 'CD001') break;
      if (type === 255) break;
      if (type !== 1 && type !== 2) continue;
      for (const off of [813, 830, 864]) long.copy(iso, vd + off);
      const root = vd + 156;
      short.copy(iso, root + 18);
      // Rock Ridge lives in the primary tree; Joliet (type 2) records carry no system-use data.
      walkDir(iso.readUInt32LE(root + 2), iso.readUInt32LE(root + 10), type === 1);
    }
    await fh.write(iso, 0, iso.length, 0);
  } finally {
    await fh.close();
  }
}
