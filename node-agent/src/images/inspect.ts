// What a downloaded file is, and whether the node will use it. Pure functions over `qemu-img info` and the first
// bytes of the file; the rules are listed in README.md ("Detection rules") and applied in this order.
import { ImageError } from './errors.ts';
import type { QemuImgInfo } from './qemuimg.ts';

/** Bytes of the file's start that judge() looks at (covers the ISO 9660 volume descriptor at 32 KiB). */
export const HEAD_BYTES = 64 * 1024;
/** One sector: nothing smaller is a disk. */
export const MIN_IMAGE_BYTES = 512;

/** Glance disk_format → the format name qemu-img reports ('iso' is ours: qemu-img calls an ISO raw). */
const QEMU_FORMAT: Readonly<Record<string, string>> = {
  raw: 'raw',
  ami: 'raw', // an Amazon machine image is a raw disk
  qcow2: 'qcow2',
  vmdk: 'vmdk',
  vdi: 'vdi',
  vhd: 'vpc',
  vhdx: 'vhdx',
  ploop: 'parallels',
  iso: 'iso',
};

/** VMDK subformats that are one self-contained file (Nova's vmdk_allowed_types). */
const SAFE_VMDK_TYPES = new Set(['monolithicSparse', 'streamOptimized']);

/** Throws NotADiskImage for a declared format the node cannot boot, before anything is downloaded. */
export function checkDeclaredFormat(diskFormat: string, what: string): void {
  if (diskFormat === 'aki' || diskFormat === 'ari') {
    throw new ImageError(
      'NotADiskImage',
      `${what}: diskFormat ${diskFormat} is an Amazon ${diskFormat === 'aki' ? 'kernel' : 'ramdisk'} image, not a bootable disk`,
    );
  }
  if (!Object.hasOwn(QEMU_FORMAT, diskFormat)) {
    throw new ImageError(
      'NotADiskImage',
      `${what}: unsupported diskFormat ${JSON.stringify(diskFormat)} (supported: ${Object.keys(QEMU_FORMAT).join(', ')})`,
    );
  }
}

/** ISO 9660 ("CD001") or UDF ("BEA01"/"NSR0x") volume descriptor at 32 KiB + 1. */
export function isIso(head: Uint8Array): boolean {
  const id = Buffer.from(head.subarray(0x8001, 0x8006)).toString('latin1');
  return id === 'CD001' || id === 'BEA01' || id === 'NSR02' || id === 'NSR03';
}

const MAGICS: readonly { name: string; offset: number; bytes: readonly number[] }[] = [
  { name: 'gzip-compressed data', offset: 0, bytes: [0x1f, 0x8b] },
  { name: 'xz-compressed data', offset: 0, bytes: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00] },
  { name: 'zstd-compressed data', offset: 0, bytes: [0x28, 0xb5, 0x2f, 0xfd] },
  { name: 'bzip2-compressed data', offset: 0, bytes: [0x42, 0x5a, 0x68] },
  { name: 'a zip archive', offset: 0, bytes: [0x50, 0x4b, 0x03, 0x04] },
  { name: 'a tar archive (an OVA?)', offset: 257, bytes: [0x75, 0x73, 0x74, 0x61, 0x72] },
];

/** Up to 48 printable characters of the start, for messages. */
export function excerpt(head: Uint8Array): string {
  const s = Buffer.from(head.subarray(0, 48))
    .toString('latin1')
    .replace(/[^\x20-\x7e]/g, '.');
  return JSON.stringify(head.length > 48 ? `${s}...` : s);
}

/**
 * Why data that qemu-img calls raw is not a disk image, or undefined when it may be one. qemu-img calls anything
 * without a known header raw, so this catches what web servers hand out instead of images: markup (error and
 * login pages), other text, and compressed files or archives (a disk must be served uncompressed; Glance's
 * container formats other than bare are not supported). A real disk's first 64 KiB always hold binary data (the
 * MBR/GPT and filesystem structures are full of zero bytes); a text file's never do.
 */
export function notADiskReason(head: Uint8Array): string | undefined {
  let i = 0;
  if (head[0] === 0xef && head[1] === 0xbb && head[2] === 0xbf) i = 3; // UTF-8 BOM
  while (i < head.length && (head[i] === 0x20 || head[i] === 0x09 || head[i] === 0x0a || head[i] === 0x0d)) i++;
  if (head[i] === 0x3c /* < */) {
    return `an HTML or XML document (it starts with ${excerpt(head.subarray(i))}), e.g. a web server's error or login page`;
  }
  for (const m of MAGICS) {
    if (m.bytes.every((b, j) => head[m.offset + j] === b)) {
      return `${m.name}: serve the disk image itself, uncompressed`;
    }
  }
  if (!head.includes(0)) {
    try {
      new TextDecoder('utf-8', { fatal: true }).decode(head, { stream: true });
      return `text (it starts with ${excerpt(head)}), not binary disk data`;
    } catch {
      // binary without zero bytes: unusual, but not text; let it through
    }
  }
  return undefined;
}

function describe(format: string): string {
  switch (format) {
    case 'raw':
      return 'raw data (no qcow2, vmdk, vdi, vhd or vhdx header)';
    case 'iso':
      return 'an ISO 9660 image';
    case 'vpc':
      return 'vhd (qemu-img: vpc)';
    case 'parallels':
      return 'ploop (qemu-img: parallels)';
    default:
      return format;
  }
}

export interface Judgement {
  /** The format of the data as detected: a qemu-img format name, or 'iso'. */
  format: string;
  virtualSize: number;
}

/**
 * Decides whether the downloaded data (`size` bytes, starting with `head`, described by `info` from a probing
 * `qemu-img info`) is a usable disk image of the declared `diskFormat`. Throws ImageError NotADiskImage or
 * FormatMismatch; `what` names the image in messages.
 */
export function judge(diskFormat: string, info: QemuImgInfo, head: Uint8Array, size: number, what: string): Judgement {
  checkDeclaredFormat(diskFormat, what);
  const refuse = (why: string) => new ImageError('NotADiskImage', `${what}: ${why}`);
  if (size < MIN_IMAGE_BYTES) throw refuse(`the data is only ${size} bytes, less than one 512-byte sector`);
  let format = info.format;
  if (format === 'raw' && isIso(head)) format = 'iso';
  if (format === 'raw') {
    const why = notADiskReason(head);
    if (why) throw refuse(`the data is ${why}, not a disk image`);
  }
  const expected = QEMU_FORMAT[diskFormat]!;
  if (format !== expected) {
    throw new ImageError(
      'FormatMismatch',
      `${what}: declared diskFormat ${diskFormat}, but the data is ${describe(format)}`,
    );
  }
  // Self-contained images only: anything that makes QEMU open another file is an escape from the image.
  const backing = info['full-backing-filename'] ?? info['backing-filename'];
  if (backing !== undefined) {
    throw refuse(
      `the ${describe(format)} image has a backing file (${JSON.stringify(backing)}); images must be self-contained`,
    );
  }
  const data = info['format-specific']?.data;
  if (data?.['data-file'] !== undefined) {
    throw refuse(
      `the qcow2 image has an external data file (${JSON.stringify(data['data-file'])}); images must be self-contained`,
    );
  }
  if (info.encrypted || data?.encrypt !== undefined) throw refuse(`the ${describe(format)} image is encrypted`);
  if (data?.corrupt === true) throw refuse('the qcow2 image is marked corrupt');
  if (format === 'vmdk') {
    const type = data?.['create-type'];
    if (!type || !SAFE_VMDK_TYPES.has(type)) {
      throw refuse(
        `vmdk subformat ${type ?? '(unknown)'} is not allowed (only ${[...SAFE_VMDK_TYPES].join(' and ')}, which are one self-contained file)`,
      );
    }
    const extents = data?.extents ?? [];
    if (extents.length !== 1 || (info.filename !== undefined && extents[0]?.filename !== info.filename)) {
      throw refuse(`the vmdk image refers to other files (${extents.map((e) => e.filename).join(', ')})`);
    }
  }
  if (info['virtual-size'] <= 0) throw refuse('the disk has a virtual size of 0 bytes');
  return { format, virtualSize: info['virtual-size'] };
}
