#include "server/image_stager.h"

#include <sqlite3.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace synod::server {
namespace {

std::string Path(const std::string& name) {
  return std::string(std::getenv("TEST_TMPDIR")) + "/" + name;
}

// A database file at `path` made by running `sql`.
void MakeDatabase(const std::string& path, const std::string& sql) {
  std::remove(path.c_str());
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
}

TEST(CheckStagedFile, AValidImageIsPreparedAndItsVerdictIsOk) {
  const std::string path = Path("valid.db");
  MakeDatabase(path,
               "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);"
               "CREATE TABLE _synod_meta(id);");
  bool verdict = false;
  absl::Status status = CheckStagedFile(path, &verdict);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_TRUE(verdict);
  // Prepared in place: a rollback header, and Synod's own table of an earlier life gone.
  FILE* file = fopen(path.c_str(), "rb");
  ASSERT_NE(file, nullptr);
  unsigned char header[20];
  ASSERT_EQ(fread(header, 1, sizeof(header), file), sizeof(header));
  fclose(file);
  EXPECT_EQ(header[18], 1);
  EXPECT_EQ(header[19], 1);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  EXPECT_NE(sqlite3_exec(db, "SELECT * FROM _synod_meta", nullptr, nullptr, nullptr), SQLITE_OK);
  EXPECT_EQ(sqlite3_exec(db, "SELECT * FROM t", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
}

TEST(CheckStagedFile, WhatIsWrongWithTheImageIsItsVerdict) {
  bool verdict = false;
  const std::string garbage = Path("garbage.db");
  FILE* file = fopen(garbage.c_str(), "wb");
  ASSERT_NE(file, nullptr);
  fputs(std::string(8192, 'x').c_str(), file);
  fclose(file);
  absl::Status status = CheckStagedFile(garbage, &verdict);
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_TRUE(verdict);

  const std::string reserved = Path("reserved.db");
  MakeDatabase(reserved, "CREATE TABLE _synod_sessions(x);");
  verdict = false;
  status = CheckStagedFile(reserved, &verdict);
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_TRUE(verdict);
}

TEST(CheckStagedFile, WhatIsWrongWithThisMachineIsNeverAVerdict) {
  // A file that is not there, or a directory where the copy should be: this replica's
  // trouble, tried again, never an INVALID_ARGUMENT result that other replicas would not give.
  bool verdict = true;
  absl::Status status = CheckStagedFile(Path("missing.db"), &verdict);
  EXPECT_FALSE(status.ok());
  EXPECT_FALSE(absl::IsInvalidArgument(status)) << status;
  EXPECT_FALSE(verdict);
  const std::string dir = Path("a-directory");
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  verdict = true;
  status = CheckStagedFile(dir, &verdict);
  EXPECT_FALSE(status.ok());
  EXPECT_FALSE(absl::IsInvalidArgument(status)) << status;
  EXPECT_FALSE(verdict);
}

}  // namespace
}  // namespace synod::server
