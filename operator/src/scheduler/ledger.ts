// The scheduler's in-memory book of claims, one per server. A claim is assumed as soon as a host is
// chosen, before the binding reaches the API, so the next decision (possibly microseconds later, in
// the same burst) already sees the resources taken; the informer confirms it once the binding is
// visible, and a failed binding or a deleted server forgets it.
import { type Claim, emptyUsage, type Usage } from './host-state.ts';

export type ClaimState = 'assumed' | 'confirmed';

interface Entry {
  claim: Claim;
  state: ClaimState;
}

export class ClaimLedger {
  readonly #byServer = new Map<string, Entry>();
  readonly #byNode = new Map<string, Map<string, Claim>>();

  /**
   * Records that `claim.server` now consumes `claim` on `claim.node`, replacing any earlier claim
   * of the same server (so assuming twice never double counts, and a new node moves the claim).
   */
  assume(claim: Claim): void {
    this.#put({ ...claim }, 'assumed');
  }

  /** Marks the server's claim as seen in the API. False when the ledger has no claim for it. */
  confirm(server: string): boolean {
    const e = this.#byServer.get(server);
    if (!e) return false;
    e.state = 'confirmed';
    return true;
  }

  /** Drops the server's claim (binding failed, server deleted). False when there was none. */
  forget(server: string): boolean {
    const e = this.#byServer.get(server);
    if (!e) return false;
    this.#byServer.delete(server);
    const onNode = this.#byNode.get(e.claim.node);
    onNode?.delete(server);
    if (onNode?.size === 0) this.#byNode.delete(e.claim.node);
    return true;
  }

  /**
   * Replaces the book with what the API says (every server that has a node), all confirmed.
   * Assumed claims of servers absent from `claims` are kept: their binding is still in flight.
   */
  rebuild(claims: Iterable<Claim>): void {
    const inFlight = [...this.#byServer.values()].filter((e) => e.state === 'assumed');
    this.#byServer.clear();
    this.#byNode.clear();
    for (const c of claims) this.#put({ ...c }, 'confirmed');
    for (const e of inFlight) if (!this.#byServer.has(e.claim.server)) this.#put(e.claim, 'assumed');
  }

  get(server: string): Readonly<Claim> | undefined {
    return this.#byServer.get(server)?.claim;
  }

  stateOf(server: string): ClaimState | undefined {
    return this.#byServer.get(server)?.state;
  }

  get size(): number {
    return this.#byServer.size;
  }

  /** Every claim. */
  claims(): Claim[] {
    return [...this.#byServer.values()].map((e) => e.claim);
  }

  claimsOn(node: string): Claim[] {
    return [...(this.#byNode.get(node)?.values() ?? [])];
  }

  usageOf(node: string): Usage {
    const u = emptyUsage();
    for (const c of this.#byNode.get(node)?.values() ?? []) {
      u.vcpus += c.vcpus;
      u.ramMiB += c.ramMiB;
      u.diskGiB += c.diskGiB;
      u.servers += 1;
    }
    return u;
  }

  /** Hosts where members of the group (`namespace/name`) are placed, sorted. */
  hostsOfGroup(group: string): string[] {
    const hosts = new Set<string>();
    for (const { claim } of this.#byServer.values()) if (claim.group === group) hosts.add(claim.node);
    return [...hosts].sort();
  }

  #put(claim: Claim, state: ClaimState): void {
    this.forget(claim.server);
    this.#byServer.set(claim.server, { claim, state });
    const onNode = this.#byNode.get(claim.node) ?? new Map<string, Claim>();
    this.#byNode.set(claim.node, onNode);
    onNode.set(claim.server, claim);
  }
}
