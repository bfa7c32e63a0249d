#include "adapters/snapshot_image.h"

#include <sqlite3.h>
#include <stdlib.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "adapters/file_database_opener.h"
#include "core/replica.h"
#include "core/state_machine.h"
#include "gtest/gtest.h"

namespace synod {
namespace {

namespace fs = std::filesystem;

Value Exec(std::string_view database, std::string_view sql) {
  Value value;
  Command* command = value.add_requests()->mutable_command();
  command->mutable_execute()->set_database(std::string(database));
  command->mutable_execute()->add_statements()->set_sql(std::string(sql));
  return value;
}

Value Create(std::string_view database) {
  Value value;
  value.add_requests()->mutable_command()->mutable_create_database()->set_name(
      std::string(database));
  return value;
}

// A replica's data directory: its database files and a state machine on them.
struct Replica {
  explicit Replica(const std::string& dir) {
    absl::StatusOr<std::unique_ptr<FileDatabaseOpener>> created =
        FileDatabaseOpener::Create(dir, /*fsync=*/false);
    EXPECT_TRUE(created.ok()) << created.status();
    opener = std::move(*created);
    absl::StatusOr<std::unique_ptr<StateMachine>> opened = StateMachine::Open(opener.get());
    EXPECT_TRUE(opened.ok()) << opened.status();
    sm = std::move(*opened);
  }
  std::unique_ptr<FileDatabaseOpener> opener;
  std::unique_ptr<StateMachine> sm;
};

class SnapshotImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string pattern =
        std::string(base != nullptr ? base : "/tmp") + "/snapshot_image_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    fs::create_directories(Stage());
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Stage() const { return dir_ + "/stage"; }
  std::string ImagePath() const { return dir_ + "/image.snap"; }

  // Two databases with rows, at revision `slot_`.
  void Fill(StateMachine& sm) {
    sm.Apply(++slot_, Create("a"));
    sm.Apply(++slot_, Create("b"));
    sm.Apply(++slot_, Exec("a", "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)"));
    sm.Apply(++slot_, Exec("b", "CREATE TABLE u(x TEXT UNIQUE)"));
    // Virtual tables are checked with an INSERT of a command: the unpacked copy must take it.
    sm.Apply(++slot_, Exec("b", "CREATE VIRTUAL TABLE f USING fts4(body)"));
    sm.Apply(++slot_, Exec("b", "CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)"));
    sm.Apply(++slot_, Exec("b", "INSERT INTO f VALUES ('a full text row')"));
    sm.Apply(++slot_, Exec("b", "INSERT INTO r VALUES (1, 0.5, 2.5)"));
    for (int i = 0; i < 50; ++i) {
      sm.Apply(++slot_, Exec("a", "INSERT INTO t(v) VALUES (randomblob(3000))"));
      sm.Apply(++slot_, Exec("b", absl::StrCat("INSERT INTO u VALUES ('row ", i, "')")));
    }
  }

  std::string dir_;
  uint64_t slot_ = 0;
};

TEST_F(SnapshotImageTest, AnImageWrittenFromAViewRestoresTheStateOfItsRevision) {
  Replica source(dir_ + "/source");
  Fill(*source.sm);
  const uint64_t revision = source.sm->revision();
  const uint64_t hash = source.sm->StateHash();
  absl::StatusOr<SnapshotView> view = source.sm->OpenSnapshotView();
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->revision, revision);
  absl::StatusOr<SnapshotView> hashed = source.sm->OpenSnapshotView();
  ASSERT_TRUE(hashed.ok()) << hashed.status();
  // Entries applied while the view is open are not in the image.
  for (int i = 0; i < 20; ++i) {
    source.sm->Apply(++slot_, Exec("a", "INSERT INTO t(v) VALUES (randomblob(3000))"));
  }
  source.sm->Apply(++slot_, Exec("b", "DELETE FROM u"));
  // A divergence vote's hash, computed from the view after those entries: the state of its
  // revision.
  EXPECT_EQ(StateMachine::StateHashOf(*hashed), hash);
  EXPECT_NE(source.sm->StateHash(), hash);
  absl::StatusOr<SnapshotMeta> meta =
      WriteSnapshotImage(*view, Stage() + "/copy", ImagePath(), /*fsync=*/true);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->index(), revision);
  EXPECT_EQ(meta->size_bytes(), fs::file_size(ImagePath()));
  std::ifstream in(ImagePath(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(meta->checksum(), SnapshotChecksum(bytes));
  EXPECT_TRUE(StateMachine::CheckSnapshot(bytes, revision).ok())
      << "the in-memory reader reads the same format";

  EXPECT_TRUE(view->databases.empty() || view->databases[0].second == nullptr)
      << "the readers stay open after their copy";

  Replica target(dir_ + "/target");
  absl::StatusOr<SnapshotImages> images = StageSnapshotImage(ImagePath(), Stage(), revision);
  ASSERT_TRUE(images.ok()) << images.status();
  ASSERT_TRUE(target.sm->RestoreSnapshotImages(*std::move(images)).ok());
  // The unpacked databases were moved into place, not copied.
  for (const auto& f : fs::directory_iterator(Stage())) {
    ADD_FAILURE() << "left in the stage: " << f.path();
  }
  EXPECT_EQ(target.sm->revision(), revision);
  EXPECT_EQ(target.sm->StateHash(), hash);
  absl::StatusOr<StatementResult> found = target.sm->Query("b", [] {
    Statement s;
    s.set_sql("SELECT count(*) FROM f WHERE f MATCH 'text'");
    return s;
  }());
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->rows(0).values(0).integer(), 1);
}

TEST_F(SnapshotImageTest, ADamagedImageIsRefusedBeforeAnythingIsRestored) {
  Replica source(dir_ + "/source");
  Fill(*source.sm);
  const uint64_t revision = source.sm->revision();
  absl::StatusOr<SnapshotView> view = source.sm->OpenSnapshotView();
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_TRUE(WriteSnapshotImage(*view, Stage() + "/copy", ImagePath(), false).ok());
  const uintmax_t size = fs::file_size(ImagePath());

  // The wrong revision.
  EXPECT_TRUE(
      absl::IsInvalidArgument(StageSnapshotImage(ImagePath(), Stage(), revision + 1).status()));
  // A flipped byte anywhere: in a frame header, a database, or the trailer.
  for (uintmax_t at : {uintmax_t{20}, size / 2, size - 3}) {
    fs::remove_all(Stage());
    fs::create_directories(Stage());
    fs::copy_file(ImagePath(), dir_ + "/damaged.snap", fs::copy_options::overwrite_existing);
    {
      std::fstream f(dir_ + "/damaged.snap", std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(static_cast<std::streamoff>(at));
      char c = 0;
      f.get(c);
      f.seekp(static_cast<std::streamoff>(at));
      f.put(static_cast<char>(c ^ 0x40));
    }
    absl::StatusOr<SnapshotImages> staged =
        StageSnapshotImage(dir_ + "/damaged.snap", Stage(), revision);
    EXPECT_FALSE(staged.ok()) << "byte " << at;
  }
  // Cut short.
  fs::remove_all(Stage());
  fs::create_directories(Stage());
  fs::resize_file(ImagePath(), size - 100);
  EXPECT_FALSE(StageSnapshotImage(ImagePath(), Stage(), revision).ok());
}

// A replica that stops while it checks a peer's image does not wait for the whole check.
TEST_F(SnapshotImageTest, ACheckStopsOnceCancelled) {
  Replica source(dir_ + "/source");
  Fill(*source.sm);
  absl::StatusOr<SnapshotView> view = source.sm->OpenSnapshotView();
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_TRUE(WriteSnapshotImage(*view, Stage() + "/copy", ImagePath(), false).ok());
  std::atomic<bool> cancel{true};
  absl::StatusOr<SnapshotImages> staged =
      StageSnapshotImage(ImagePath(), Stage(), source.sm->revision(), &cancel);
  EXPECT_TRUE(absl::IsCancelled(staged.status())) << staged.status();
  cancel.store(false);
  fs::remove_all(Stage());
  fs::create_directories(Stage());
  EXPECT_TRUE(StageSnapshotImage(ImagePath(), Stage(), source.sm->revision(), &cancel).ok());
}

}  // namespace
}  // namespace synod
