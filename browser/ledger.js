// The ledger card on the server's page (issue 19): a participant's balance, stake, rewards
// per round and any slash with its reason (GET /api/ledger/account/{node}), and the run's
// open proposals with their stake tallies (GET /api/ledger). The account shown is the node id
// typed in the card (kept in ?account= and localStorage), else this tab's own node
// (window.daaNode, browser/node/panel.js). Voting is the CLI's (`native_node ledger vote`).
// No dependencies; every server-provided string goes in through textContent.

const LEDGER_POLL_MS = 4000;
const LEDGER_REWARDS_SHOWN = 12;
const LEDGER_STORE_KEY = 'daa-ledger-account';
const HEX64 = /^[0-9a-f]{64}$/;

const ledger = { typed: '', shown: null, view: null, account: null, error: null };

const byId = (id) => document.getElementById(id);

function ledgerEl(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function ledgerRow(label, value) {
  const li = document.createElement('li');
  li.append(ledgerEl('span', label), ledgerEl('span', value));
  return li;
}

function ledgerSetText(id, text) {
  const node = byId(id);
  if (node && node.textContent !== text) node.textContent = text;
}

const units = (n) => (typeof n === 'number' && isFinite(n) ? n.toLocaleString('en-US') : '–');
const short = (id) => (typeof id === 'string' ? id.slice(0, 12) : '–');

/** The node id whose account the card shows: the typed one, else this tab's node. */
function ledgerNodeId() {
  if (HEX64.test(ledger.typed)) return ledger.typed;
  const own = window.daaNode?.stats?.nodeId;
  return typeof own === 'string' && HEX64.test(own) ? own : null;
}

async function ledgerJSON(url) {
  const res = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

async function ledgerPoll() {
  try {
    const node = ledgerNodeId();
    const [view, account] = await Promise.all([
      ledgerJSON('/api/ledger'),
      node ? ledgerJSON(`/api/ledger/account/${node}`) : Promise.resolve(null),
    ]);
    ledger.view = view;
    ledger.account = account;
    ledger.shown = node;
    ledger.error = null;
  } catch (err) {
    ledger.error = String(err.message || err);
  } finally {
    renderLedger();
    setTimeout(ledgerPoll, LEDGER_POLL_MS);
  }
}

function renderLedger() {
  renderLedgerSummary();
  renderLedgerAccount();
  renderLedgerProposals();
}

function renderLedgerSummary() {
  const v = ledger.view;
  ledgerSetText('ledger-summary', !v ? (ledger.error ? 'ledger unavailable' : '') :
    `${units(v.entries)} entries · supply ${units(v.supply)} · staked ${units(v.total_stake)}`
    + (v.rules?.min_stake > 0 ? ` · stake to join ${units(v.rules.min_stake)}` : ''));
}

function renderLedgerAccount() {
  const a = ledger.account;
  const typedBad = ledger.typed !== '' && !HEX64.test(ledger.typed);
  ledgerSetText('ledger-account-status', typedBad ? 'a node id is 64 lowercase hex characters'
    : ledger.error && !a ? `could not read the ledger: ${ledger.error}`
      : !ledger.shown ? 'this tab has no node id yet: type one to see its account'
        : `account ${short(ledger.shown)}${ledger.shown === window.daaNode?.stats?.nodeId
          ? ' (this tab)' : ''}`);
  byId('ledger-account').hidden = !a;
  if (!a) return;
  const rewards = Array.isArray(a.rewards) ? a.rewards : [];
  const slashes = Array.isArray(a.slashes) ? a.slashes : [];
  const earned = rewards.reduce((s, r) => s + (typeof r.amount === 'number' ? r.amount : 0), 0);
  ledgerSetText('ledger-balance', units(a.balance));
  ledgerSetText('ledger-stake', units(a.stake));
  ledgerSetText('ledger-earned', `${units(earned)} in ${rewards.length} round${rewards.length === 1 ? '' : 's'}`);
  ledgerSetText('ledger-admitted', a.admitted ? 'yes' : 'no: not enough stake');
  const recent = rewards.slice(-LEDGER_REWARDS_SHOWN).reverse();
  byId('ledger-rewards').replaceChildren(...(recent.length ? recent.map(
    (r) => ledgerRow(`round ${r.round}`, `+${units(r.amount)}`))
    : [ledgerEl('li', 'no rewards yet: each committed round pays the nodes whose updates it took')]));
  byId('ledger-rewards-more').hidden = rewards.length <= LEDGER_REWARDS_SHOWN;
  ledgerSetText('ledger-rewards-more', `and ${rewards.length - LEDGER_REWARDS_SHOWN} earlier rounds`);
  byId('ledger-slashes').replaceChildren(...(slashes.length ? slashes.map((s) => {
    const li = ledgerRow(`round ${s.round}: ${s.evidence}`, `−${units(s.amount)}`);
    li.classList.add('ledger-slash');
    if (s.reason && s.reason !== s.evidence) li.append(ledgerEl('div', s.reason, 'ledger-reason'));
    return li;
  }) : [ledgerEl('li', 'none')]));
}

function renderLedgerProposals() {
  const props = Array.isArray(ledger.view?.open_proposals) ? ledger.view.open_proposals : [];
  const body = byId('ledger-proposals');
  if (!props.length) {
    const td = ledgerEl('td', 'no open proposals', 'empty');
    td.colSpan = 5;
    const tr = document.createElement('tr');
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...props.map((p) => {
    const tr = document.createElement('tr');
    const total = typeof p.total_stake === 'number' && p.total_stake > 0 ? p.total_stake : 0;
    const pct = total ? ` (${Math.round((100 * p.yes) / total)}%)` : '';
    tr.append(ledgerEl('td', `#${p.seq}`, 'num'),
      ledgerEl('td', `${p.key} = ${JSON.stringify(p.value)}`),
      ledgerEl('td', short(p.by)),
      ledgerEl('td', `${units(p.yes)}${pct} / ${units(p.no)}`, 'num'),
      ledgerEl('td', `passes above ${units(Math.floor(total / 2))} of ${units(total)} staked`
        + (typeof p.expires_after_round === 'number' ? `; expires when round ${p.expires_after_round} commits` : '')));
    return tr;
  }));
}

function initLedger() {
  if (!byId('ledger-card')) return;
  const input = byId('ledger-node');
  const params = new URLSearchParams(location.search);
  ledger.typed = (params.get('account') || localStorage.getItem(LEDGER_STORE_KEY) || '').trim().toLowerCase();
  input.value = ledger.typed;
  input.addEventListener('change', () => {
    ledger.typed = input.value.trim().toLowerCase();
    if (ledger.typed) localStorage.setItem(LEDGER_STORE_KEY, ledger.typed);
    else localStorage.removeItem(LEDGER_STORE_KEY);
    ledger.account = null;
    renderLedger();
    if (ledgerNodeId()) {
      ledgerJSON(`/api/ledger/account/${ledgerNodeId()}`).then((a) => {
        ledger.account = a; ledger.shown = ledgerNodeId(); renderLedger();
      }).catch((err) => { ledger.error = String(err.message || err); renderLedger(); });
    }
  });
  ledgerSetText('ledger-vote-cmd', `python -m native_node ledger vote SEQ yes --coordinator ${location.host || 'HOST:PORT'}`);
  ledgerPoll();
}

initLedger();
