import { describe, expect, it } from 'vitest';
import { ImageError } from './errors.ts';
import { checkDeclaredFormat, isIso, judge, notADiskReason } from './inspect.ts';
import type { QemuImgInfo } from './qemuimg.ts';

const binary = (n = 4096) => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7) & 0xff; // contains zero bytes, like every real disk
  return b;
};
const info = (format: string, extra: Partial<QemuImgInfo> = {}): QemuImgInfo => ({
  'virtual-size': 64 << 20,
  format,
  filename: '/c/.dl-x',
  ...extra,
});
const reasonOf = (fn: () => unknown) => {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ImageError);
    return `${(err as ImageError).reason}: ${(err as ImageError).message}`;
  }
  return 'accepted';
};

describe('notADiskReason (data qemu-img calls raw)', () => {
  it('accepts binary data', () => {
    expect(notADiskReason(binary())).toBeUndefined();
    expect(notADiskReason(Buffer.alloc(4096))).toBeUndefined(); // a blank disk
  });
  it('refuses markup, text and compressed data', () => {
    expect(notADiskReason(Buffer.from('\n  <!DOCTYPE html><html>nope</html>'))).toMatch(/HTML or XML document/);
    expect(notADiskReason(Buffer.from('\ufeff<?xml version="1.0"?><Error/>'))).toMatch(/HTML or XML/);
    expect(notADiskReason(Buffer.from('just some words\n'.repeat(100)))).toMatch(/^text \(it starts with "just/);
    expect(notADiskReason(Buffer.from('Grüße, ünïcödé\n'.repeat(100)))).toMatch(/^text/);
    expect(notADiskReason(Buffer.from([0x1f, 0x8b, 8, 0, 0, 0]))).toMatch(/gzip/);
    expect(notADiskReason(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 1]))).toMatch(/xz/);
    const tar = binary(1024);
    tar.write('ustar', 257, 'latin1');
    expect(notADiskReason(tar)).toMatch(/tar archive/);
  });
});

describe('judge', () => {
  const what = 'image ns/img';
  it('accepts matching formats (vhd is qemu-img vpc, ploop parallels, ami raw)', () => {
    expect(judge('qcow2', info('qcow2'), binary(), 1 << 20, what)).toEqual({ format: 'qcow2', virtualSize: 64 << 20 });
    expect(judge('vhd', info('vpc'), binary(), 1 << 20, what).format).toBe('vpc');
    expect(judge('ploop', info('parallels'), binary(), 1 << 20, what).format).toBe('parallels');
    expect(judge('ami', info('raw'), binary(), 1 << 20, what).format).toBe('raw');
  });
  it('tells ISO 9660 from raw', () => {
    const iso = Buffer.alloc(64 * 1024);
    iso.write('\x01CD001\x01', 0x8000, 'latin1');
    expect(isIso(iso)).toBe(true);
    expect(judge('iso', info('raw'), iso, iso.length, what).format).toBe('iso');
    expect(reasonOf(() => judge('raw', info('raw'), iso, iso.length, what))).toMatch(
      /^FormatMismatch: image ns\/img: declared diskFormat raw, but the data is an ISO 9660 image/,
    );
    expect(reasonOf(() => judge('iso', info('raw'), binary(), 4096, what))).toMatch(/^FormatMismatch.*raw data/);
  });
  it('refuses what is not a disk before comparing formats', () => {
    expect(reasonOf(() => judge('raw', info('raw'), binary(100), 100, what))).toMatch(/^NotADiskImage.*only 100 bytes/);
    const text = Buffer.from('hello\n'.repeat(200));
    expect(reasonOf(() => judge('qcow2', info('raw'), text, text.length, what))).toMatch(/^NotADiskImage.*text/);
    expect(reasonOf(() => judge('qcow2', info('raw'), binary(), 4096, what))).toMatch(
      /^FormatMismatch: .*declared diskFormat qcow2, but the data is raw data/,
    );
  });
  it('refuses images that make QEMU open other files', () => {
    expect(
      reasonOf(() => judge('qcow2', info('qcow2', { 'backing-filename': '/etc/shadow' }), binary(), 4096, what)),
    ).toMatch(/^NotADiskImage.*backing file \("\/etc\/shadow"\)/);
    const dataFile = info('qcow2', { 'format-specific': { type: 'qcow2', data: { 'data-file': '/dev/sda' } } });
    expect(reasonOf(() => judge('qcow2', dataFile, binary(), 4096, what))).toMatch(/external data file/);
    const flat = info('vmdk', {
      'format-specific': {
        type: 'vmdk',
        data: { 'create-type': 'monolithicFlat', extents: [{ filename: '/etc/passwd' }] },
      },
    });
    expect(reasonOf(() => judge('vmdk', flat, binary(), 4096, what))).toMatch(
      /vmdk subformat monolithicFlat is not allowed/,
    );
    const twoExtents = info('vmdk', {
      'format-specific': {
        type: 'vmdk',
        data: { 'create-type': 'monolithicSparse', extents: [{ filename: '/c/.dl-x' }, { filename: '/etc/passwd' }] },
      },
    });
    expect(reasonOf(() => judge('vmdk', twoExtents, binary(), 4096, what))).toMatch(/refers to other files/);
    expect(reasonOf(() => judge('qcow2', info('qcow2', { encrypted: true }), binary(), 4096, what))).toMatch(
      /encrypted/,
    );
  });
  it('refuses kernel/ramdisk images and unknown formats before downloading', () => {
    expect(reasonOf(() => checkDeclaredFormat('aki', what))).toMatch(/^NotADiskImage.*kernel/);
    expect(reasonOf(() => checkDeclaredFormat('floppy', what))).toMatch(
      /^NotADiskImage.*unsupported diskFormat "floppy"/,
    );
    expect(reasonOf(() => checkDeclaredFormat('vhdx', what))).toBe('accepted');
  });
});
