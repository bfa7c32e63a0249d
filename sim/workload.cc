// Part of the simulated world (sim/world_internal.h).

#include "sim/world_internal.h"

namespace synod::sim::internal {

// ---------------------------------------------------------------------------------------
// Clients.

Statement World::StatementFor(const ClientOp& op) const {
  Statement s;
  auto text = [](const std::string& v) {
    SqlValue x;
    x.set_text(v);
    return x;
  };
  auto integer = [](int64_t v) {
    SqlValue x;
    x.set_integer(v);
    return x;
  };
  switch (op.kind) {
    case ClientOpKind::kWrite:
      s.set_sql(
          "INSERT INTO kv(key, value) VALUES (?, ?) "
          "ON CONFLICT(key) DO UPDATE SET value = excluded.value");
      break;
    case ClientOpKind::kIncrement:
      s.set_sql(
          "INSERT INTO kv(key, value) VALUES (?, ?) "
          "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value");
      break;
    case ClientOpKind::kAppend:
      s.set_sql("INSERT INTO list(key, element, noise) VALUES (?, ?, random())");
      break;
    case ClientOpKind::kRead:
      s.set_sql("SELECT value FROM kv WHERE key = ?");
      break;
    case ClientOpKind::kReadList:
      s.set_sql("SELECT element FROM list WHERE key = ? ORDER BY id");
      break;
  }
  *s.add_params() = text(op.key);
  if (op.kind == ClientOpKind::kWrite || op.kind == ClientOpKind::kIncrement ||
      op.kind == ClientOpKind::kAppend) {
    *s.add_params() = integer(op.argument);
  }
  return s;
}

ClientOp World::MixedWorkloadOp(uint32_t* target) {
  int k = static_cast<int>(workload_.Range(0, 2));
  int which = static_cast<int>(workload_.Range(0, 9));
  ClientOp op;
  if (which < 2) {
    op.kind = ClientOpKind::kWrite;
    op.key = absl::StrCat("r", k);
    op.argument = next_value_++;
  } else if (which < 4) {
    op.kind = ClientOpKind::kIncrement;
    op.key = absl::StrCat("c", k);
    op.argument = 1;
  } else if (which < 5) {
    op.kind = ClientOpKind::kAppend;
    op.key = absl::StrCat("l", k);
    op.argument = next_value_++;
  } else {
    op = RandomRead(k, /*linearizable_levels=*/5, /*lease_levels=*/8);
  }
  *target = static_cast<uint32_t>(workload_.Range(1, options_.replicas));
  return op;
}

ClientOp World::ReadsWorkloadOp(Client& c, uint32_t* target) {
  ClientOp op;
  *target = c.read_replica;
  if (!c.read_back_key.empty()) {
    // Reads back, through another replica, the write acknowledged a moment ago.
    op.key = std::move(c.read_back_key);
    c.read_back_key.clear();
    op.kind = op.key[0] == 'l' ? ClientOpKind::kReadList : ClientOpKind::kRead;
    return op;
  }
  int k = static_cast<int>(workload_.Range(0, 2));
  int which = static_cast<int>(workload_.Range(0, 9));
  if (which < 3) {
    *target = c.write_replica;
    int model = static_cast<int>(workload_.Range(0, 2));
    op.kind = model == 0   ? ClientOpKind::kWrite
              : model == 1 ? ClientOpKind::kIncrement
                           : ClientOpKind::kAppend;
    op.key = absl::StrCat(model == 0 ? "r" : model == 1 ? "c" : "l", k);
    op.argument = op.kind == ClientOpKind::kIncrement ? 1 : next_value_++;
    return op;
  }
  return RandomRead(k, /*linearizable_levels=*/8, /*lease_levels=*/9);
}

ClientOp World::RandomRead(int k, int linearizable_levels, int lease_levels) {
  ClientOp op;
  int model = static_cast<int>(workload_.Range(0, 2));
  op.kind = model == 2 ? ClientOpKind::kReadList : ClientOpKind::kRead;
  op.key = absl::StrCat(model == 0 ? "r" : model == 1 ? "c" : "l", k);
  int level = static_cast<int>(workload_.Range(0, 9));
  op.consistency = level < linearizable_levels ? LINEARIZABLE
                   : level < lease_levels      ? LEASE
                                               : LOCAL;
  return op;
}

void World::ClientStartOp(uint64_t client_index) {
  Client& c = clients_[client_index];
  if (!clients_issue_) return;
  c.busy = true;
  c.attempts = 0;
  c.call_us = now_us_;
  uint32_t target = 0;
  ClientOp op = options_.workload == Workload::kReads ? ReadsWorkloadOp(c, &target)
                                                      : MixedWorkloadOp(&target);
  c.op = op;
  bool is_read = op.kind == ClientOpKind::kRead || op.kind == ClientOpKind::kReadList;
  c.sequence = is_read ? kReadSequenceBase + ++c.reads : ++c.writes;
  Operation h;
  h.id = history_.size() + 1;
  h.client_id = c.id;
  h.key = op.key;
  h.argument = op.argument;
  h.call_tick = now_us_;
  h.ambiguous = true;  // until an answer says otherwise
  switch (op.kind) {
    case ClientOpKind::kWrite:
      h.kind = OpKind::kWrite;
      break;
    case ClientOpKind::kIncrement:
      h.kind = OpKind::kIncrement;
      break;
    case ClientOpKind::kAppend:
      h.kind = OpKind::kAppend;
      break;
    case ClientOpKind::kRead:
      h.kind = OpKind::kRead;
      break;
    case ClientOpKind::kReadList:
      h.kind = OpKind::kReadList;
      break;
  }
  c.op_index = history_.size();
  history_.push_back(h);
  c.target = target;
  ClientSend(client_index);
}

void World::ClientSend(uint64_t client_index) {
  Client& c = clients_[client_index];
  ++c.attempts;
  c.attempt_deadline_us = now_us_ + kClientTimeoutUs;
  Trace(absl::StrCat("client ", c.id, " seq ", c.sequence, " attempt ", c.attempts, " -> ",
                     c.target, " key ", c.op.key));
  Schedule(now_us_ + net_.Range(100, 1'000), EventKind::kClientRequest, c.target, Message(),
           client_index, c.sequence);
  Schedule(c.attempt_deadline_us, EventKind::kClientDeadline, static_cast<uint32_t>(client_index),
           Message(), 0, c.sequence);
}

void World::OnClientRequest(Host& h, uint64_t client_index, uint64_t sequence) {
  Client& c = clients_[client_index];
  if (!h.up || h.paused || !c.busy || c.sequence != sequence) return;
  bool is_read = c.op.kind == ClientOpKind::kRead || c.op.kind == ClientOpKind::kReadList;
  if (is_read && c.op.consistency == LOCAL) return ServeRead(h, client_index, sequence);
  ClientRequest req;
  req.set_client_id(c.id);
  req.set_sequence(sequence);
  req.set_timestamp_unix_ms(1'700'000'000'000 + now_us_ / 1000);
  if (is_read) {
    req.mutable_command()->mutable_read_barrier()->set_consistency(c.op.consistency);
    h.pending_reads[{c.id, sequence}] = client_index;
  } else {
    Execute* e = req.mutable_command()->mutable_execute();
    e->set_database(kDatabase);
    *e->add_statements() = StatementFor(c.op);
    e->set_transaction(true);
    h.pending_writes[{c.id, sequence}] = client_index;
  }
  h.replica().Propose(std::move(req));
  DrainHost(h);
}

void World::ClientWake(uint64_t client_index) {
  Client& c = clients_[client_index];
  if (!c.busy || now_us_ < c.attempt_deadline_us) return;
  bool is_read = c.sequence >= kReadSequenceBase;
  // A write is retried, with the same sequence, until it has a definite answer (the
  // session applies it at most once); until then it counts as ambiguous.
  if (!is_read || c.attempts < kReadAttempts) {
    c.target = c.target % options_.replicas + 1;
    return ClientSend(client_index);
  }
  Trace(absl::StrCat("client ", c.id, " seq ", c.sequence, " gives up the read"));
  c.busy = false;
  ClientStartOp(client_index);
}

void World::ClientDone(uint64_t client_index, uint64_t sequence, bool ok,
                       const CommandResult* result, const StatementResult* rows,
                       uint64_t revision) {
  Client& c = clients_[client_index];
  if (!c.busy || c.sequence != sequence) return;
  if (!ok) {
    // Refused: try the next replica at once (the same sequence, so it applies at most once).
    if (result != nullptr && result->code() != UNAVAILABLE) {
      Fail(absl::StrCat("client ", c.id, " seq ", sequence, " failed: ", result->message()));
    }
    c.attempt_deadline_us = now_us_ + kRetryPauseUs;
    Schedule(c.attempt_deadline_us, EventKind::kClientDeadline, static_cast<uint32_t>(client_index),
             Message(), 0, sequence);
    return;
  }
  Operation& h = history_[c.op_index];
  h.ambiguous = false;
  h.return_tick = now_us_;
  if (rows != nullptr) {
    if (h.kind == OpKind::kRead) {
      h.read_value = rows->rows_size() == 0 ? 0 : rows->rows(0).values(0).integer();
    } else {
      for (const Row& r : rows->rows()) h.read_list.push_back(r.values(0).integer());
    }
    if (c.op.consistency == LOCAL) {
      local_reads_.back().value = h.kind == OpKind::kRead ? h.read_value : 0;
      h.ambiguous = true;  // local reads are not linearizable; checked on their own
    }
    // Without leases a lease read may be stale, by design: it is not checked.
    if (c.op.consistency == LEASE && !options_.leases) h.ambiguous = true;
  }
  Trace(absl::StrCat("client ", c.id, " seq ", sequence, " ok at revision ", revision));
  c.busy = false;
  if (options_.workload == Workload::kReads) {
    if (rows == nullptr) c.read_back_key = c.op.key;
    // No think time, but the next operation starts a microsecond later: one called at the
    // instant another returned counts as concurrent with it, and a read-back must follow the
    // write it reads back.
    Schedule(now_us_ + 1, EventKind::kClientWake, static_cast<uint32_t>(client_index), Message(), 0,
             sequence);
    return;
  }
  Schedule(now_us_ + workload_.Range(kThinkMinUs, kThinkMaxUs), EventKind::kClientWake,
           static_cast<uint32_t>(client_index), Message(), 0, sequence);
}

}  // namespace synod::sim::internal
