// sshFingerprint against the real ssh-keygen (the unit test pins known fingerprints).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import { sshFingerprint } from '../../src/controllers/keypair.ts';

requireTools('ssh-keygen');
const dir = mkdtempSync(join(tmpdir(), 'kp-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('sshFingerprint', () => {
  it.each(['ed25519', 'rsa', 'ecdsa'])('matches ssh-keygen -l for a fresh %s key', (type) => {
    const key = join(dir, type);
    execFileSync('ssh-keygen', ['-q', '-t', type, '-N', '', '-C', 'x@y', '-f', key]);
    const pub = readFileSync(`${key}.pub`, 'utf8');
    const expected = execFileSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', `${key}.pub`], {
      encoding: 'utf8',
    }).split(' ')[1];
    expect(sshFingerprint(pub)).toBe(expected);
  });
});
